# `make help` lists the targets.
PY ?= python
ARGS ?=

.PHONY: help install lock readme-numbers test test-slow presets-tiny presets-tiny-editing presets-tiny-probes table bench lint format demo cfg stats clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

CONSTRAINTS ?= requirements/constraints.txt

install:  ## install PyTorch 2.13.0 first (no CUDA wheels pulled in), then the project + dev tools at the tested versions
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) torch==2.13.0
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"

lock:  ## rewrite requirements/constraints.txt from this environment (after a tested upgrade)
	{ sed -n '1,/^# torch==/p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

test:  ## the default test suite (CPU, no network, about 12 minutes on 2 cores)
	$(PY) -m pytest -q

test-slow:  ## the slow tests (longer end-to-end runs)
	$(PY) -m pytest -q -m slow

# the unlearning presets' rows that CI runs at tiny size (UNLEARN_TINY=<all of conf/recipe> for every row);
# the tiny TOFU toys decline 16 unseen questions (unlearn.toy_refusals), in proportion to their 16 items per split
UNLEARN_TINY ?= memit_fixed,memit_merged,alphaedit_self_improve,wise_fixed,npo

# Two lanes that share no cached toy, statistics or artifact (each trains the toys of its own
# datasets), so `make -j2 presets-tiny` runs them side by side on one thread each (CI does).
TINY = +size=tiny model=toy threads=1 progress=false model.train.progress=false

presets-tiny: presets-tiny-editing presets-tiny-probes  ## every experiment preset and the SSS C sweep on the toy model at tiny size (CI runs it with -j2)

presets-tiny-editing:  ## Table 1, Table 2, scaling, AlphaEdit Table 1, lifelong zsRE, SSS Tables 1-2 (CounterFact and zsRE toys)
	$(PY) run.py +experiment=table1 $(TINY) $(ARGS)
	$(PY) run.py +experiment=table2 $(TINY) $(ARGS)
	$(PY) run.py +experiment=scaling $(TINY) 'dataset.size=4,16' $(ARGS)
	$(PY) run.py +experiment=alphaedit_table1 $(TINY) $(ARGS)
	$(PY) run.py +experiment=lifelong_zsre $(TINY) 'dataset.size=1,4,16' $(ARGS)
	$(PY) run.py +experiment=sss_table1 $(TINY) $(ARGS)
	$(PY) run.py +experiment=sss_table2 $(TINY) 'dataset.size=1,4,16' $(ARGS)

presets-tiny-probes:  ## SSS Tables 3 and 5 and the C sweep (probe-set toys), unlearning on TOFU and RWKU, TIES-merged unlearning, the forget-items curve
	$(PY) run.py +experiment=sss_table3 $(TINY) $(ARGS)
	$(PY) run.py +experiment=sss_table5 $(TINY) $(ARGS)
	$(PY) run.py sweep=sss_c $(TINY) $(ARGS)
	$(PY) run.py +experiment=unlearn_tofu $(TINY) dataset.forget_split=forget01 unlearn.toy_refusals=16 '+recipe=$(UNLEARN_TINY)' $(ARGS)
	$(PY) run.py +experiment=unlearn_rwku $(TINY) '+recipe=$(UNLEARN_TINY)' $(ARGS)
	$(PY) run.py +experiment=ties_unlearn $(TINY) dataset.forget_split=forget01 unlearn.toy_refusals=16 $(ARGS)
	$(PY) run.py sweep=forget_items editor=memit unlearn.merge_queries=4 $(TINY) dataset.forget_split=forget01 unlearn.toy_refusals=16 'unlearn.forget_items=4,8,16' $(ARGS)

table:  ## paper-format table of run/sweep folders: make table ARGS="multirun/table1/2026-01-01_12-00-00"
	$(PY) -m runner.table $(ARGS)

readme-numbers:  ## rerun every command whose numbers the README shows and rewrite its tables (about an hour on 2 cores): ARGS="--only default,sizes"
	$(PY) -m tools.readme_numbers $(ARGS)

bench:  ## speed and memory, batched vs one case at a time, then the cost per edit as a sequential stream grows (toy, CPU): make bench ARGS="--cases 64 --batch 32" STREAM_ARGS="--checkpoints 10,100,500"
	$(PY) -m bench $(ARGS)
	$(PY) -m bench.stream $(STREAM_ARGS)

lint:  ## ruff check + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:  ## ruff format + autofix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

demo:  ## MEMIT on the locally trained toy model and the bundled CounterFact sample
	$(PY) run.py $(ARGS)

cfg:  ## print the composed config: make cfg ARGS="editor=rome model=gpt-j"
	$(PY) run.py --cfg job $(ARGS)

stats:  ## compute covariance statistics only: make stats ARGS="model=gpt-j stats=wikipedia"
	$(PY) run.py task=stats $(ARGS)

clean:  ## remove run outputs (keeps the .cache of models and statistics)
	rm -rf outputs multirun .pytest_cache .ruff_cache
