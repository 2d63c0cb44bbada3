"The data side end to end: corpus -> tokenizer -> KDDataset -> sampler/DataLoader batches (-> teacher cache)."
import json
import stat

import pytest
import torch
from torch import nn

from kd_lib.dataset import CHATML_TEMPLATE, ChatTemplate, KDDataset, LengthBucketBatchSampler, decode_mask, render_chat
from kd_lib.extractors import extract_tool_calls
from kd_lib.synth import run_tool, write_corpus
from kd_lib.teacher_cache import TeacherCache, build_teacher_cache
from kd_lib.tokenizer import build_tokenizer, load_hf_tokenizer, load_tokenizer, save_tokenizer, tokenizer_hash

CONTRACT_KEYS = {'input_ids', 'attention_mask', 'labels', 'tool_name_mask', 'json_argument_mask', 'integration_mask',
                 'tool_result_mask', 'metadata', 'index'}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp('corpus')
    paths = write_corpus(out, n_train=240, n_eval=60, seed=7, plans=True, code_mode=True)
    rows = [json.loads(l) for l in paths['train'].read_text(encoding='utf-8').splitlines()]
    tok = build_tokenizer([r['prompt'] + r['teacher_text'] for r in rows], vocab_size=1024)
    return paths, tok


def _rows(path):
    return [json.loads(l) for l in path.read_text(encoding='utf-8').splitlines()]


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_masks_decode_to_their_spans(corpus, split):
    paths, tok = corpus
    rows, ds = _rows(paths[split]), KDDataset(paths[split], tok)
    assert len(ds) == len(rows)
    for i, row in enumerate(rows):
        item, calls = ds[i], row['metadata']['calls']
        assert decode_mask(tok, item['input_ids'], item['tool_name_mask']) == [c['name'] for c in calls]
        assert [json.loads(t) for t in decode_mask(tok, item['input_ids'], item['json_argument_mask'])] == [c['arguments'] for c in calls]
        assert [json.loads(t) for t in decode_mask(tok, item['input_ids'], item['tool_result_mask'])] == [c['result'] for c in calls]
        assert all(t in row['metadata']['answer'] for t in decode_mask(tok, item['input_ids'], item['integration_mask']))
        n_prompt = 1 + len(tok.encode(row['prompt']).ids)
        assert (item['labels'][:n_prompt - 1] == -100).all() and item['labels'][n_prompt - 1] == item['input_ids'][n_prompt]


def test_batches_follow_the_contract_and_resume(corpus):
    paths, tok = corpus
    ds = KDDataset(paths['train'], tok)
    sampler = LengthBucketBatchSampler(ds.lengths, batch_size=16, seed=3)
    batches = list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate))
    assert sorted(int(i) for b in batches for i in b['index']) == list(range(len(ds)))
    b = batches[0]
    assert set(b) == CONTRACT_KEYS and b['input_ids'].dtype == b['labels'].dtype == torch.long
    assert (b['labels'][b['attention_mask'] == 0] == -100).all()
    assert all({'kind', 'loops', 'needed_calls', 'answer', 'plan'} <= set(m) for m in b['metadata'])
    # resume mid-epoch from the sampler's state: the rest of the epoch is identical
    s1 = LengthBucketBatchSampler(ds.lengths, batch_size=16, seed=3)
    it = iter(s1)
    [next(it) for _ in range(3)]
    s2 = LengthBucketBatchSampler(ds.lengths, batch_size=16, seed=3)
    s2.load_state_dict(s1.state_dict())
    assert [list(map(int, x['index'])) for x in batches[3:]] == list(s2)


def test_generated_calls_can_be_executed(corpus):
    paths, _ = corpus
    for row in _rows(paths['eval']):
        calls = extract_tool_calls(row['teacher_text'])
        assert [(c.name, c.arguments, c.error) for c in calls] == [(c['name'], c['arguments'], None) for c in row['metadata']['calls']]
        assert all(run_tool(c.name, c.arguments) == m['result'] for c, m in zip(calls, row['metadata']['calls']))


def test_hf_tokenizer_folder_gives_the_same_dataset(corpus, tmp_path):
    from transformers import PreTrainedTokenizerFast
    paths, tok = corpus
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>').save_pretrained(tmp_path / 'hf')
    hf = load_hf_tokenizer(tmp_path / 'hf')
    a, b = KDDataset(paths['eval'], tok), KDDataset(paths['eval'], hf, cache_dir=tmp_path / 'c')
    assert all(torch.equal(a[i]['labels'], b[i]['labels']) for i in range(len(a)))
    assert tokenizer_hash(load_tokenizer(save_tokenizer(tok, tmp_path / 'plain'))) == tokenizer_hash(tok)


class _Teacher(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids).cumsum(1))


def test_teacher_cache_reaches_the_batch(corpus, tmp_path):
    paths, tok = corpus
    ds = KDDataset(paths['eval'], tok)
    teacher = _Teacher(tok.get_vocab_size())
    build_teacher_cache(teacher, ds, tmp_path / 'tc', k=4, fingerprint='t1')
    ds = KDDataset(paths['eval'], tok, teacher_cache=TeacherCache(tmp_path / 'tc', fingerprint='t1', k=4, tokenizer=tok))
    batch = ds.collate([ds[i] for i in range(6)])
    assert set(batch) == CONTRACT_KEYS | {'teacher_topk_ids', 'teacher_topk_logprobs'}
    with torch.no_grad():
        logp = torch.log_softmax(teacher(batch['input_ids'], batch['attention_mask']).float(), -1)
    keep = batch['labels'] != -100
    top = logp.topk(4, -1)
    assert torch.allclose(batch['teacher_topk_logprobs'][keep], top.values[keep], atol=2e-2)


def _chatml_tokenizer(texts):
    "A tiny local Hugging Face tokenizer with ChatML special tokens and a ChatML chat template (no download)."
    from transformers import PreTrainedTokenizerFast
    bpe = build_tokenizer(texts, vocab_size=1024)
    bpe.add_special_tokens(['<|im_start|>', '<|im_end|>'])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|im_end|>', pad_token='<|im_end|>', chat_template=CHATML_TEMPLATE)


def test_chat_corpus_from_a_read_only_folder(corpus, tmp_path):
    paths, _ = corpus
    hf = _chatml_tokenizer([r['prompt'] + r['teacher_text'] for r in _rows(paths['train'])])
    data = tmp_path / 'shared'
    chat = write_corpus(data, n_train=40, n_eval=24, seed=7, plans=True, fmt='chat')
    before = sorted(p.name for p in data.iterdir())
    data.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try: ds = KDDataset(chat['eval'], hf, max_length=1024)
    finally: data.chmod(stat.S_IRWXU)
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written next to the data
    rows, template = _rows(chat['eval']), ChatTemplate(hf)
    batches = list(torch.utils.data.DataLoader(ds, batch_sampler=LengthBucketBatchSampler(ds.lengths, 8, seed=0), collate_fn=ds.collate))
    assert sorted(int(i) for b in batches for i in b['index']) == list(range(len(rows)))
    for b in batches:
        assert set(b) == CONTRACT_KEYS and (b['labels'][b['attention_mask'] == 0] == -100).all()
        for j, i in enumerate(map(int, b['index'])):
            row, calls = rows[i], rows[i]['metadata']['calls']
            text = render_chat(template, row['messages'], row['tools'])
            assert decode_mask(hf, b['input_ids'][j], b['labels'][j] != -100) == [text.text[s:e] for s, e in text.assistant]
            assert decode_mask(hf, b['input_ids'][j], b['tool_name_mask'][j]) == [c['name'] for c in calls]
            assert [json.loads(t) for t in decode_mask(hf, b['input_ids'][j], b['json_argument_mask'][j])] == [c['arguments'] for c in calls]
            assert [json.loads(t) for t in decode_mask(hf, b['input_ids'][j], b['tool_result_mask'][j])] == [c['result'] for c in calls]
