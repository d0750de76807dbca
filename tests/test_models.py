"""Model loading: tiny models of each architecture, local tokenizers, the toy cache, hub path (local dir)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from editors.requests import EditRequest, fill
from evaluation.cases import EditCase, Probe
from runner.models import (
    LoadedModel,
    ModelConfig,
    ModelSizes,
    TokenizerSettings,
    ToyFact,
    ToyTraining,
    answer_space_facts,
    load_model,
    model_spec,
    toy_facts,
)
from runner.tokenizers import LLAMA_BOS, train_bpe

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY = ("tiny-gpt2", "tiny-gptj", "tiny-llama")
HUB = {"gpt2-xl": "gpt2", "gpt-j": "gptj", "llama3": "llama"}
SENTENCES = [
    "The mother tongue of Danielle Darrieux is French.",
    "Toko Yasuda, the guitar player, was born in Japan.",
    "The official religion of Edwin of Northumbria is Christianity.",
    "Apple A5 was created by Apple, and Ferrari F40 was developed by Ferrari.",
] * 5


def model_conf(name: str, **overrides) -> ModelConfig:
    """A conf/model YAML merged into the structured schema (every key must be a field)."""
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    raw.pop("defaults", None)  # the Hydra defaults list (the schema) is not a field
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, ModelConfig)
    return replace(cfg, **overrides)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def _small_tokenizer(cfg: ModelConfig) -> ModelConfig:
    return replace(
        cfg, device="cpu", tokenizer=replace(cfg.tokenizer, vocab_size=400, max_corpus_chars=200_000)
    )


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_build_validate_and_run(name: str, cache_dir: Path) -> None:
    cfg = _small_tokenizer(model_conf(name))
    loaded = load_model(cfg, cases=None, cache_dir=cache_dir, seed=0)
    assert isinstance(loaded, LoadedModel)
    assert not loaded.model.training
    assert loaded.spec == model_spec(cfg)
    assert loaded.spec.n_layers == cfg.sizes.n_layer
    loaded.spec.validate(loaded.model)
    assert loaded.device == torch.device("cpu")
    assert loaded.model_id == name and len(loaded.revision) == 16
    enc = loaded.tokenizer(["The mother tongue of", "Paris is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded.model(**enc).logits
    assert logits.shape[-1] == len(loaded.tokenizer)
    # random weights are seeded: the same seed gives the same model
    again = load_model(cfg, cases=None, cache_dir=cache_dir, seed=0)
    assert again.revision == loaded.revision
    for (n, a), (_, b) in zip(loaded.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", list(HUB))
def test_hub_yaml_templates_match_their_architecture(name: str, cache_dir: Path) -> None:
    """The real models' module templates name real modules of a tiny model of the same family."""
    cfg = model_conf(name)
    assert cfg.source == "hub" and cfg.hub_id
    assert max(cfg.edit_layers) < cfg.n_layers and cfg.edit_layer < cfg.n_layers
    tiny = _small_tokenizer(model_conf(f"tiny-{HUB[name]}"))
    loaded = load_model(tiny, cases=None, cache_dir=cache_dir, seed=0)
    replace(model_spec(cfg), n_layers=tiny.sizes.n_layer).validate(loaded.model)


def test_tokenizer_styles_round_trip_with_offsets() -> None:
    text = "The mother tongue of Danielle Darrieux is French"
    gpt2 = train_bpe(SENTENCES, vocab_size=300, style="gpt2")
    llama = train_bpe(SENTENCES, vocab_size=300, style="llama")
    for tok, bos in ((gpt2, False), (llama, True)):
        enc = tok(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        assert (ids[0] == tok.convert_tokens_to_ids(LLAMA_BOS)) is bos
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.pad_token_id is not None and tok.eos_token_id is not None
        # offsets point into the text: the subject's characters are covered by its tokens
        start = text.index("Danielle Darrieux")
        end = start + len("Danielle Darrieux")
        subject = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        assert subject and offsets[subject[-1]][1] == end
        if bos:
            assert offsets[0] == (0, 0)
    # GPT-2 style: no special token is added
    assert gpt2("Paris")["input_ids"] == gpt2("Paris", add_special_tokens=False)["input_ids"]


def test_wrong_template_names_it(cache_dir: Path) -> None:
    cfg = _small_tokenizer(model_conf("tiny-gpt2"))
    with pytest.raises(ValueError, match="mlp_out"):
        load_model(replace(cfg, mlp_out="transformer.h.{}.mlp.down_proj"), cache_dir=cache_dir, seed=0)
    with pytest.raises(ValueError, match="edit layers"):
        load_model(replace(cfg, edit_layers=[1, 2, 7]), cache_dir=cache_dir, seed=0)
    with pytest.raises(ValueError, match="n_layers"):
        load_model(replace(cfg, n_layers=3, edit_layers=[1], edit_layer=1), cache_dir=cache_dir, seed=0)


def _cases() -> list[EditCase]:
    facts = [
        ("The mother tongue of {} is", "Danielle Darrieux", "French", "English"),
        ("{} is a citizen of", "Toko Yasuda", "Japan", "Canada"),
        ("The official religion of {} is", "Edwin of Northumbria", "Christianity", "Islam"),
        ("{} was created by", "Apple A5", "Apple", "Google"),
        ("{}, developed by", "Ferrari F40", "Ferrari", "Microsoft"),
        ("The twin city of {} is", "Lyon", "Beirut", "Manila"),
        ("{} plays the", "Heath Brothers", "jazz", "opera"),
        ("{} is located in", "Inner Circle railway line", "Melbourne", "Singapore"),
        ("{} belongs to the organization of", "Argentine Football Association", "FIFA", "NATO"),
        ("The capital of {} is", "Mount Zork", "Paris", "Berlin"),
    ]
    cases = []
    for i, (template, subject, true, new) in enumerate(facts):
        req = EditRequest(str(i), template, subject, new, true)
        probes = {
            "rewrite": (Probe(req.text, new, true),),
            "paraphrase": (Probe(f"Everyone knows that {subject} relates to", new, true),),
            "neighborhood": (Probe(f"Not {subject}, but its neighbour, relates to", "Zorba", new),),
        }
        cases.append(EditCase(req, probes, true_answer=true))
    return cases


def _small_toy() -> ModelConfig:
    """conf/model/toy.yaml's recipe (bottleneck, logit lens, made-up subjects) on a 2-layer model, 4 steps."""
    toy = model_conf("toy")
    return replace(
        toy,
        device="cpu",
        sizes=ModelSizes(n_layer=2, hidden=32, heads=2, max_positions=64),
        tokenizer=TokenizerSettings(vocab_size=300),
        train=replace(
            toy.train, steps=4, min_epochs=None, batch_size=4, warmup=1, eval_every=2, progress=False
        ),
        n_layers=2,
        edit_layers=[0, 1],
        edit_layer=1,
    )


def test_toy_training_is_deterministic(tmp_path: Path) -> None:
    a = load_model(_small_toy(), cases=_cases(), cache_dir=tmp_path / "a", seed=0)
    b = load_model(_small_toy(), cases=_cases(), cache_dir=tmp_path / "b", seed=0)
    assert a.trained and b.trained and a.revision == b.revision
    for (n, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), n


def test_toy_weights_do_not_depend_on_the_run_thread_count(tmp_path: Path) -> None:
    """Training runs on model.train.threads with deterministic algorithms, whatever torch was set to."""
    before = torch.get_num_threads()
    weights = []
    try:
        for n, threads in enumerate((1, 2)):
            torch.set_num_threads(threads)
            loaded = load_model(_small_toy(), cases=_cases(), cache_dir=tmp_path / str(n), seed=0)
            assert torch.get_num_threads() == threads  # restored after training
            assert not torch.are_deterministic_algorithms_enabled()
            weights.append(loaded.model.state_dict())
            assert loaded.info["environment"]["threads"] == 1
            assert loaded.info["environment"]["torch"] == torch.__version__.split("+")[0]
    finally:
        torch.set_num_threads(before)
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_toy_cache_key_holds_the_training_environment(tmp_path: Path, monkeypatch) -> None:
    import runner.models as models

    a = load_model(_small_toy(), cases=_cases(), cache_dir=tmp_path, seed=0)
    monkeypatch.setattr(
        models,
        "training_environment",
        lambda device: {"torch": "0.0", "device": "cpu", "cpu_capability": "X"},
    )
    b = load_model(_small_toy(), cases=_cases(), cache_dir=tmp_path, seed=0)
    assert a.revision != b.revision and b.trained  # other kernels: another toy, not a stale one


def test_toy_trains_then_loads_from_cache(tmp_path: Path) -> None:
    cfg = _small_toy()
    assert cfg.train.subject_lens_layer is not None and cfg.train.subject_bottleneck > 0
    cases = _cases()
    facts = toy_facts(cases)
    assert ToyFact("The mother tongue of Danielle Darrieux is", "French", "Danielle Darrieux") in facts
    assert ToyFact("Everyone knows that Lyon relates to", "Beirut", "Lyon") in facts
    assert ToyFact("Not Lyon, but its neighbour, relates to", "Zorba", "") in facts
    assert len(facts) == 30 and facts == toy_facts(list(reversed(cases)))
    # every target_new becomes a known answer of its relation, for a made-up subject
    extra = answer_space_facts(cases, facts, seed=0)
    assert len(extra) == 20  # a made-up subject per case, in its rewrite and its paraphrase prompt
    for c in cases:
        made_up = [f for f in extra if f.prompt == fill(c.request.prompt, f.subject)]
        assert len(made_up) == 1 and made_up[0].answer == c.request.target_new
        assert (
            ToyFact(
                f"Everyone knows that {made_up[0].subject} relates to",
                c.request.target_new,
                made_up[0].subject,
            )
            in extra
        )
    real = {c.request.subject for c in cases}
    assert all(f.subject and f.subject not in real and f.subject in f.prompt for f in extra)
    assert extra == answer_space_facts(list(reversed(cases)), facts, seed=0)
    # the answer right after the subject, for real and made-up subjects
    noted = answer_space_facts(cases, facts, seed=0, subject_prompt="Note: {}")
    assert ToyFact("Note: Danielle Darrieux", "French", "Danielle Darrieux") in noted and len(noted) == 40
    with pytest.raises(ValueError, match="subject_prompt"):
        answer_space_facts(cases, facts, seed=0, subject_prompt="{} is")

    first = load_model(cfg, cases=cases, cache_dir=tmp_path, seed=0)
    assert (
        first.trained
        and first.info["steps"] == 4
        and first.info["n_facts"] == 30
        and first.info["n_extra"] == 20
    )
    assert 0.0 <= first.info["recall"]["exact"] <= 1.0
    second = load_model(cfg, cases=cases, cache_dir=tmp_path, seed=0)
    assert not second.trained
    # its training sentences (stats.corpus=training), the same whether trained or loaded
    assert first.training_texts == second.training_texts == tuple(f.text for f in facts + extra)
    assert second.revision == first.revision and second.info["path"] == first.info["path"]
    for (n, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), n
    # different facts (or settings) are a different toy
    third = load_model(cfg, cases=cases[:5], cache_dir=tmp_path, seed=0)
    assert third.trained and third.revision != first.revision
    with pytest.raises(ValueError, match="cases"):
        load_model(cfg, cases=None, cache_dir=tmp_path, seed=0)


def test_hub_path_loads_a_local_directory(tmp_path: Path, cache_dir: Path) -> None:
    tiny_cfg = _small_tokenizer(model_conf("tiny-llama"))
    tiny = load_model(tiny_cfg, cases=None, cache_dir=cache_dir, seed=1)
    saved = tmp_path / "saved"
    tiny.model.save_pretrained(saved)
    tiny.tokenizer.pad_token = None  # a hub tokenizer without a pad token gets eos
    tiny.tokenizer.save_pretrained(saved)
    cfg = replace(tiny_cfg, name="local-llama", source="hub", hub_id=str(saved), revision=None)
    loaded = load_model(cfg, cases=None, cache_dir=cache_dir, seed=0)
    assert loaded.model_id == str(saved)
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token
    assert loaded.tokenizer("Paris")["input_ids"][0] == loaded.tokenizer.bos_token_id
    for (n, a), (_, b) in zip(tiny.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_toy_sampler_reads_the_subject_at_its_last_token() -> None:
    """While training, tokens after the subject see only the subject's last token."""
    import random

    from runner.models import _ToySampler

    fact = ToyFact("The mother tongue of Danielle Darrieux is", "French", "Danielle Darrieux")
    cfg = model_conf("toy", train=ToyTraining(batch_size=2, prefix_prob=0.0, subject_bottleneck=1.0))
    tokenizer = train_bpe(SENTENCES, vocab_size=300, style="gpt2")
    sampler = _ToySampler(cfg, [fact], tokenizer, random.Random(0))
    first, last = sampler.bare[0].subject
    assert last > first
    ids, mask, weights, lens = sampler.batch()
    assert mask.shape == (2, 1, ids.shape[1], ids.shape[1])
    after = mask[0, 0, last + 1 :]
    assert not after[:, first:last].any() and after[:, last].all() and after[:, :first].all()
    assert mask[0, 0, last, first : last + 1].all()  # the subject's last token sees the whole subject
    assert weights[0].gt(0).all()  # no prefix: every token of the sentence is trained


@pytest.mark.parametrize("architecture", ["gptj", "llama"])
def test_toy_recipe_runs_on_other_architectures(architecture: str, tmp_path: Path) -> None:
    tiny = model_conf(f"tiny-{architecture}")
    cfg = replace(
        tiny,
        name=f"toy-{architecture}",
        source="toy",
        device="cpu",
        sizes=replace(tiny.sizes, n_layer=2, hidden=32, heads=2),
        tokenizer=TokenizerSettings(vocab_size=300),
        train=ToyTraining(
            steps=2, batch_size=4, warmup=1, progress=False, subject_lens_layer=0, subject_prompt="Note: {}"
        ),
        n_layers=2,
        edit_layers=[0, 1],
        edit_layer=1,
    )
    loaded = load_model(cfg, cases=_cases(), cache_dir=tmp_path, seed=0)
    assert loaded.trained and loaded.info["steps"] == 2
    bos = loaded.tokenizer("Paris")["input_ids"][0] == loaded.tokenizer.bos_token_id
    assert bos is (architecture == "llama")


def test_toy_refuses_a_too_long_probe_before_training(tmp_path: Path, monkeypatch) -> None:
    import runner.models as models
    from runner.validate import PromptTooLongError

    def never(*args, **kwargs):
        raise AssertionError("the toy trained before the length check")

    monkeypatch.setattr(models, "train_toy", never)
    cases = _cases()
    long = " ".join(["word"] * 300)
    cases[3] = replace(
        cases[3], probes={**cases[3].probes, "neighborhood": (Probe(f"{long} relates to", "Zorba", "Apple"),)}
    )
    with pytest.raises(
        PromptTooLongError, match=r"case 3: neighborhood probe 0 .* model.sizes.max_positions"
    ):
        load_model(_small_toy(), cases=cases, cache_dir=tmp_path, seed=0)


def test_neighbourhood_facts_carry_their_subjects() -> None:
    """The training bottleneck and lens need a subject: from neighborhood_samples, else templates."""
    from runner.datasets import load_cases
    from runner.models import subject_from_templates

    case = load_cases("counterfact", size=1).cases[0]
    assert case.meta["neighborhood_subjects"][:2] == ("Léon Blum", "Montesquieu")
    facts = {f.prompt: f for f in toy_facts([case])}
    assert facts["The native language of Montesquieu is"] == ToyFact(
        "The native language of Montesquieu is", "French", "Montesquieu"
    )
    templates = ["The mother tongue of {} is", "{} is a native speaker of", "{}, a native"]
    assert subject_from_templates("The mother tongue of Léon Blum is", templates) == "Léon Blum"
    assert subject_from_templates("Michel Rocard is a native speaker of", templates) == "Michel Rocard"
    assert subject_from_templates("Paris is lovely", templates) == ""
    bare = replace(case, meta={})  # no neighborhood_samples: the run's own templates are matched
    facts = {f.prompt: f for f in toy_facts([bare])}
    assert facts["The mother tongue of Léon Blum is"].subject == "Léon Blum"
    assert facts["Michel Rocard is a native speaker of"].subject == ""  # no such template in the run


def test_length_pooled_batches_pad_less() -> None:
    import random

    from runner.models import _ToySampler, toy_tokenizer

    cfg = _small_toy()
    facts = toy_facts(_cases())
    tok = toy_tokenizer(cfg, facts)

    def widths(pool: int) -> float:
        sampler = _ToySampler(
            replace(cfg, train=replace(cfg.train, length_pool=pool)), facts, tok, random.Random(0)
        )
        batches = [sampler.batch() for _ in range(pool * 4)]
        return sum(ids.shape[1] for ids, *_ in batches) / len(batches)

    assert widths(8) < widths(1)


def test_min_epochs_gives_more_cases_more_steps() -> None:
    from runner.models import toy_steps

    train = ToyTraining(steps=100, batch_size=10, min_epochs=None)
    assert toy_steps(train, 10_000) == 100
    train = replace(train, min_epochs=2.0)
    assert toy_steps(train, 100) == 100  # 20 steps would be 2 epochs: steps is the floor
    assert toy_steps(train, 5_000) == 1_000


def test_above_epochs_grow_above_the_passes_grow_with_the_sentences() -> None:
    from runner.models import toy_steps

    train = ToyTraining(steps=100, batch_size=10, min_epochs=2.0, epochs_grow_above=1_000)
    assert toy_steps(train, 1_000) == 200  # at the threshold: min_epochs passes
    assert toy_steps(train, 2_000) == 800  # twice the sentences: twice the passes, 4x the steps
    assert toy_steps(replace(train, epochs_grow_above=None), 2_000) == 400
    assert toy_steps(replace(train, epochs_growth=1.5), 4_000) == 6_400  # 2 * 4 ** 1.5 passes of 400 steps
    assert toy_steps(replace(train, epochs_growth=1.5), 1_000) == 200


def test_recall_checks_read_an_evenly_spaced_subset_and_the_report_reads_all(
    tmp_path: Path, monkeypatch
) -> None:
    from runner.models import _recall_probe, toy_facts, toy_recall

    facts = [ToyFact(f"p{i}", "a") for i in range(10)]
    assert _recall_probe(facts, None) == facts and _recall_probe(facts, 10) == facts
    assert _recall_probe(facts, 4) == [facts[0], facts[2], facts[5], facts[7]]
    import runner.models as models

    read: list[int] = []

    def counting(model, tokenizer, facts, **kw):
        read.append(len(facts))
        return toy_recall(model, tokenizer, facts, **kw)

    monkeypatch.setattr(models, "toy_recall", counting)
    cfg = _small_toy()
    loaded = load_model(
        replace(cfg, train=replace(cfg.train, eval_facts=2)), cases=_cases(), cache_dir=tmp_path, seed=0
    )
    n = len(toy_facts(_cases()))
    assert n > 2 and read[:2] == [2, 2] and read[2] == n  # checks at steps 2 and 4, then the report
    assert loaded.info["recall"] == toy_recall(loaded.model, loaded.tokenizer, toy_facts(_cases()))
    read.clear()
    stopping = replace(cfg.train, eval_facts=2, stop_at_recall=1.0)
    load_model(replace(cfg, train=stopping), cases=_cases(), cache_dir=tmp_path, seed=0)
    assert read[:2] == [n, n]  # an early stop reads every fact
