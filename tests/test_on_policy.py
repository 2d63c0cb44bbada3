"On-policy distillation through run_stage: the on-policy steps are logged, and a stopped then resumed run equals an uninterrupted one bit for bit."
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, tiny_data
from kd_lib.config import Config
from kd_lib.models import ModelConfig, StudentLM
from kd_lib.recipes import prepare_data, run_stage
from kd_lib.tracing import read_metrics


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "Tiny data and a tiny kd_lib teacher folder."
    tmp = tmp_path_factory.mktemp('on_policy')
    data = tiny_data(tmp / 'data')
    cfg = Config().override(*TINY, *data)
    prepare_data(cfg)
    torch.manual_seed(1)
    StudentLM(ModelConfig(**{**cfg.model.__dict__, 'n_layers': 2})).save_pretrained(tmp / 'teacher')
    return tmp, data


def test_on_policy_run_resumes_exactly(setup):
    tmp, data = setup
    cfg = Config().override(*TINY, *data, 'teacher.kind=checkpoint', f'teacher.path={tmp / "teacher"}', 'distillation.kd_weight=1',
                            'distillation.on_policy_fraction=0.5', 'distillation.on_policy_temperature=1.0',
                            'distillation.on_policy_max_new_tokens=8')
    assert run_stage(cfg, tmp / 'full', evaluate=False).status == 'finished'
    drawn = [r['on_policy'] for r in read_metrics(tmp / 'full', split='train')]
    assert len(drawn) == 4 and all(0 <= x <= 1 for x in drawn) and 0 < sum(drawn) < 4, drawn  # some steps of each kind
    assert run_stage(cfg, tmp / 'split', until=2, evaluate=False).status == 'stopped'
    assert run_stage(cfg, tmp / 'split', evaluate=False).status == 'finished'
    assert [r['on_policy'] for r in read_metrics(tmp / 'split', split='train', latest_only=True)] == drawn
    a, b = load_file(str(tmp / 'full' / 'final' / 'model.safetensors')), load_file(str(tmp / 'split' / 'final' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
