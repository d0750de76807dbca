"""The editors the runner can build, by config name (imported by runner.schema only)."""

from editors.alphaedit import AlphaEditConfig
from editors.come import ComeAlphaEditConfig, ComeMemitConfig, ComePmetConfig
from editors.finetune import FineTuneConfig, FLearningConfig
from editors.grace import GraceConfig
from editors.memit import MemitConfig
from editors.mend import MendConfig
from editors.pmet import PmetConfig
from editors.rome import RomeConfig
from editors.serac import SeracConfig
from editors.ties_npo import TiesNpoConfig
from editors.unedited import UneditedConfig
from editors.unlearning import GradientUnlearningConfig
from editors.wise import WiseConfig

# Each editor's typed config, by the name its conf/editor/<name>.yaml uses as
# `defaults: [/schema/editor@_here_: <name>]` (ConfigStore group schema/editor, never an editor option).
# A new editor adds its config here and a YAML file; the runner never names a method.
CONFIG_SCHEMAS = {
    "rome": RomeConfig,
    "memit": MemitConfig,
    "pmet": PmetConfig,
    "come_memit": ComeMemitConfig,
    "come_pmet": ComePmetConfig,
    "alphaedit": AlphaEditConfig,
    "come_alphaedit": ComeAlphaEditConfig,
    "unedited": UneditedConfig,
    "ft": FineTuneConfig,
    "f_learning": FLearningConfig,
    "grace": GraceConfig,
    "wise": WiseConfig,
    "serac": SeracConfig,
    "mend": MendConfig,
    "ga": GradientUnlearningConfig,  # GA, and grad_diff / npo / npo_lora on top (conf/editor/ga.yaml)
    "ties_npo": TiesNpoConfig,  # two npo_lora members merged (conf/editor/ties_npo.yaml)
}
