"""Untrusted files: a checkpoint or cache file carrying a pickle payload (one that creates a file when unpickled) is
refused and the payload never runs; every load path in kd_lib is weights_only torch.load, safetensors, json or
np.load without pickles (checked on the source)."""
import ast
import hashlib
import io
import json
import pickle
import re
import shutil
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

import kd_lib
from kd_lib.checkpoint import CheckpointError, CheckpointManager
from reliability_helpers import (checkpoint_steps, data_dir, record_figures, run_cli_inprocess, train_args,  # noqa: F401
                                 train_metrics)


class Payload:
    "Unpickling this creates `marker` (a stand-in for arbitrary code)."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (exec, (f'open({self.marker!r}, "w").close()',))


def _forge_meta(folder, name: str):
    "Rewrite meta.json so the tampered file passes the size and sha256 checks (an attacker can do that too)."
    meta = json.loads((folder / 'meta.json').read_text())
    data = (folder / name).read_bytes()
    meta['files'][name] = {'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
    (folder / 'meta.json').write_text(json.dumps(meta))


def test_pickle_in_a_checkpoint_is_refused(tmp_path, data_dir, record_property):
    marker = tmp_path / 'PWNED'
    run_dir = tmp_path / 'run'
    rc, _, err = run_cli_inprocess(train_args(run_dir, data_dir, 'training.steps=2'))
    assert rc == 0, err
    ckpts = run_dir / 'checkpoints'
    newest = ckpts / 'checkpoint_step_2'
    state = torch.load(newest / 'training_state.pt', weights_only=True)
    torch.save({**state, 'extra': Payload(marker)}, newest / 'training_state.pt')  # a full pickle: torch.save allows it
    _forge_meta(newest, 'training_state.pt')
    with pytest.raises(CheckpointError, match='refused to load'): CheckpointManager(ckpts, 2).load(newest)
    # through the CLI: --resume on the tampered checkpoint is one error line, exit 2
    rc, _, err = run_cli_inprocess(train_args(tmp_path / 'other', data_dir, 'training.steps=3', '--resume', str(newest)))
    assert rc == 2 and err.startswith('kd-lib: error: ') and 'refused to load' in err and err.count('\n') == 1, err
    # the model file replaced by a pickle (payload in a safetensors' place)
    shutil.copytree(newest, ckpts / 'checkpoint_step_3')
    evil = ckpts / 'checkpoint_step_3'
    (evil / 'model.safetensors').write_bytes(pickle.dumps(Payload(marker)))
    _forge_meta(evil, 'model.safetensors')
    with pytest.raises(CheckpointError, match='refused to load'): CheckpointManager(ckpts, 3).load(evil)
    # resuming from the newest checkpoint skips both tampered ones and continues from step 1
    rc, out, err = run_cli_inprocess(train_args(run_dir, data_dir, 'training.steps=3'))
    assert rc == 0 and 'finished at step 3' in out, err
    assert not marker.exists(), 'a pickle payload ran'
    record_figures(record_property, 'untrusted_checkpoint', {'payloads_refused': 4, 'payloads_run': 0})


def _cache_run(tmp_path, data_dir, cache) -> tuple:
    "Try a KD run on `cache`: ('exit', code, stderr) or ('raised', exception type)."
    args = train_args(tmp_path / 'run', data_dir, 'training.stage=kd', 'teacher.kind=cache', f'teacher.path={cache}',
                      'distillation.kd_weight=1.0', 'training.steps=1')
    try: return ('exit', *run_cli_inprocess(args)[::2])
    except Exception as e: return ('raised', type(e).__name__)


def test_pickle_in_cache_files_is_refused(tmp_path, data_dir, record_property, monkeypatch):
    # a private token cache: the shared one is memory-mapped by runs in other test processes (same data, same key)
    monkeypatch.setenv('KD_LIB_CACHE', str(tmp_path / 'kd_lib_cache'))
    from kd_lib.dataset import KDDataset
    from kd_lib.teacher_cache import build_teacher_cache
    from kd_lib.tokenizer import load_tokenizer
    marker = tmp_path / 'PWNED'
    data = tmp_path / 'data'
    shutil.copytree(data_dir, data)
    ds = KDDataset(data / 'train.jsonl', load_tokenizer(data / 'tokenizer.json'), max_length=256)
    cache = tmp_path / 'cache'
    build_teacher_cache(lambda ids, mask: torch.randn(*ids.shape, 512), ds, cache, k=4, fingerprint='t', batch_size=32, progress=False)
    outcomes = {}
    for name in ('index.safetensors', json.loads((cache / 'manifest.json').read_text())['shards'][0]):  # teacher top-k cache
        bad = tmp_path / f'cache_{name.replace("/", "_")}'
        shutil.copytree(cache, bad)
        (bad / name).write_bytes(pickle.dumps(Payload(marker)))
        outcomes[name] = _cache_run(tmp_path / name.replace('/', '_'), data, bad)
        assert outcomes[name][:2] == ('exit', 2) and f'{bad / name}: not a valid safetensors' in outcomes[name][2], outcomes[name]
        assert not checkpoint_steps(tmp_path / name.replace('/', '_') / 'run' / 'checkpoints', complete_only=False)
    # the dataset's token cache (.npy files in the cache folder): an object array is a pickle; it is refused (never
    # unpickled), the cache counts as stale and is rebuilt, and the run trains
    (ds.cache_path / 'offsets.npy').unlink()  # a new file, as a replaced one would be: open memory maps keep the old one
    np.save(ds.cache_path / 'offsets.npy', np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.warns(UserWarning, match=r'offsets\.npy:0: <cache>: damaged token cache file .*; rebuilding the token cache'):
        outcomes['token_cache/offsets.npy'] = _cache_run(tmp_path / 'tokens', data, cache)
    assert outcomes['token_cache/offsets.npy'][:2] == ('exit', 0), outcomes['token_cache/offsets.npy']
    assert np.load(ds.cache_path / 'offsets.npy', allow_pickle=False).dtype == np.int64  # the rebuilt cache
    assert not marker.exists(), 'a pickle payload ran'
    record_figures(record_property, 'untrusted_cache', {'payloads_refused': len(outcomes), 'payloads_run': 0,
                                                        'outcomes': {k: list(map(str, v))[:2] for k, v in outcomes.items()}})


def _calls(tree, owner: str, attr: str) -> list:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr
            and isinstance(n.func.value, ast.Name) and n.func.value.id == owner]


def _keyword(call, name):
    return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)


FORBIDDEN = [r'\bweights_only = False', r'\ballow_pickle = True', r'\bread_pickle\b', r'\bfrom torch[\w .]* import [\w ,()]*\bload\b',
             r'\bserialization \. load\b', r'\bjit \. load\b', r'\bpickle \. loads?\b']  # on code tokens joined by spaces


def _code_only(text: str) -> str:
    "The source's tokens without strings and comments, joined by single spaces; statements end with ';'."
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return ' '.join(';' if t.type == tokenize.NEWLINE else t.string for t in tokens if t.type not in (tokenize.STRING, tokenize.COMMENT, tokenize.NL))


def test_every_load_path_refuses_pickles():
    "Source check of kd_lib/*.py: torch.load only with weights_only=True, no pickle-family loaders, np.load never allows pickles."
    problems, torch_loads = [], 0
    for path in sorted(Path(kd_lib.__file__).parent.glob('*.py')):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, 'torch', 'load'):
            torch_loads += 1
            if _keyword(call, 'weights_only') is not True: problems.append(f'{path.name}:{call.lineno}: torch.load without weights_only=True')
        for call in _calls(tree, 'np', 'load') + _calls(tree, 'numpy', 'load'):
            if _keyword(call, 'allow_pickle') not in (None, False): problems.append(f'{path.name}:{call.lineno}: np.load(allow_pickle=True)')
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            problems += [f'{path.name}:{node.lineno}: imports {n}' for n in names if n.split('.')[0] in ('pickle', 'cPickle', 'dill', 'joblib', 'cloudpickle', 'shelve', 'marshal')]
        code = _code_only(path.read_text())
        if len(re.findall(r'\btorch \. load\b', code)) != len(_calls(tree, 'torch', 'load')): problems.append(f'{path.name}: torch.load not called directly')
        problems += [f'{path.name}: {pattern!r}' for pattern in FORBIDDEN if re.search(pattern, code)]
    assert torch_loads >= 1 and not problems, problems  # the checkpoint loader is found, so the walk is not vacuous
