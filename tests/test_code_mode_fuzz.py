"Code-mode runtime fuzz (issue 17): random and adversarial programs, each a result or a reasoned failure within its budgets."
import ast
import random
import re
import time
from types import SimpleNamespace

import pytest

from kd_lib.code_mode import CODE_TOOL, CodeError, recorded_or_run, resolve_code_mode_result, run_program
from kd_lib.config import CodeModeConfig
from kd_lib.synth import TOOLS, make_episode

LIMITS = CodeModeConfig()  # the defaults evaluation runs with
TIGHT = CodeModeConfig(max_steps=500, max_seconds=0.5, max_container_size=5_000, max_output_chars=500)
SLACK_S = 1.0  # scheduling noise on a shared machine; the budgets themselves are checked by the notebook tests
TOOL_NAMES = sorted(TOOLS)
ARGUMENTS = sorted({p for t in TOOLS.values() for p in t.parameters.get('properties', {})})
NAMES = ['a', 'b', 'r', 'x', 'print', 'open', 'eval', 'exec', '__import__', '__builtins__', 'getattr', 'globals',
         *TOOL_NAMES[:4]]
DUNDERS = ['__class__', '__bases__', '__subclasses__', '__dict__', '__globals__', '__init__', '__mro__', '__self__',
           'keys', 'city']


def run_one(source: str, reference: dict, limits: CodeModeConfig = LIMITS, call_tool=None) -> dict:
    "Run a program the way evaluation does and check the result: an output or a reasoned error, in time and in size."
    start = time.monotonic()
    try:
        if call_tool is None:
            call = SimpleNamespace(name=CODE_TOOL, arguments={'code': source}, error=None)
            result = resolve_code_mode_result(reference, call, limits)
        else:
            try: result = {'output': run_program(source, call_tool, limits=limits)}
            except CodeError as e: result = {'error': str(e)}
    except BaseException as e:  # noqa: BLE001 - the point of the test: nothing else may leave the runtime
        pytest.fail(f'{type(e).__name__} escaped the runtime for {source[:300]!r}: {e}')
    elapsed = time.monotonic() - start
    assert elapsed <= limits.max_seconds + SLACK_S, (elapsed, source[:300])
    assert set(result) in ({'output'}, {'error'}), result
    if 'error' in result:
        assert re.match(r'line \d+: \S', result['error']), (result['error'][:300], source[:300])
        assert len(result['error']) <= limits.max_output_chars + len(' ...')
    else: assert isinstance(result['output'], str) and len(result['output']) <= limits.max_output_chars
    return result


NESTINGS = [('[', '1', ']'), ('(', '1', ')'), ('{1: ', '1', '}'), ('-', '1', ''), ('not ', '1', ''), ('~', '1', ''),
            ('lambda: ', '1', ''), ('1 if 1 else ', '1', ''), ('a', '', '[0]'), ('a', '', '.b'), ('f', '', '()'),
            ('1', '', ' ** 1'), ('1', '', ' + 1'), ('x', '', ' or x')]  # (opening, innermost, closing); the outer two n times
DOUBLINGS = {'list': ('a = [1, 1]', 'a = [a, a]'), 'dict': ("a = {'k': 1}", "a = {'k': a, 'j': a}"),
             'string': ("a = ['" + 'z' * 1_000 + "']", 'a = [a, a, a]'),
             'tool': ("a = get_time(city='Oslo')", 'a = [a, a]'),
             'chain': ('a = [1]\nb = [a, a]', 'a = [b, b]\nb = [a, a]'),
             'deep': ('a = [1]', 'a = [a]')}  # (start, repeated step)

def nested(opening: str, inner: str, closing: str, n: int) -> str: return f'x = {opening * n}{inner}{closing * n}\nprint(x)'

def doubling(name: str, n: int) -> str: return '\n'.join([DOUBLINGS[name][0]] + [DOUBLINGS[name][1]] * n + ['print(a)'])

HARMLESS = [*(nested(*nesting, n) for n in (150, 199) for nesting in NESTINGS[:3]),
            *(doubling(name, 5) for name in ('list', 'dict', 'tool', 'deep')), doubling('chain', 3), doubling('deep', 40),
            'print()', 'x = 1\r\nprint(x)\r\n', 'print(1);', 'x = ...\nprint(x)', 'x = 1j\nprint(x)',
            'x = -1e308 \nprint(x)', 'x = 1e999\nprint(x)', "x = '\\U0010ffff\\x00'\nprint([x])",
            "r = get_time(city='Oslo')\nprint(r.city, r['city'])",
            'x = [1]\n' * 2_400 + 'print(x)']

REFUSED = [
    # deep nesting, in the parser and in the interpreter
    *(nested(*nesting, n) for n in (1_000, 5_000) for nesting in NESTINGS),
    *(nested(*nesting, 150) for nesting in NESTINGS[3:]),
    'x = ' + '[' * 2000, 'print(' * 5000, ')' * 500,
    # huge literals and long programs
    'x = "' + 'a' * 200_000 + '"\nprint(x)', 'x = ' + '9' * 5_000 + '\nprint(x)', 'x = [' + '1, ' * 6_000 + ']\nprint(x)',
    "x = '" + 'é' * 19_000 + "'\nprint(x)", 'x = [' + '[], ' * 4_900 + ']\nprint(x)',
    # aliasing blow-ups
    *(doubling(name, n) for name in DOUBLINGS for n in (40, 3_000) if (name, n) != ('deep', 40)), doubling('string', 10),
    # unhashable keys and bad subscripts
    'x = {[1]: 2}\nprint(x)', 'x = {{}: 1}\nprint(x)', "r = get_time(city='Oslo')\nx = {r: 1}\nprint(x)",
    'x = {1: 2}\nprint(x[[1]])', "x = [1]\nprint(x['a'])", 'x = [1]\nprint(x[10 ** 100])',
    "x = {1: 'a', 'b': 2}\nprint(x[3])",
    'x = [1]\nprint(x[0:1])', "x = 'abc'\nprint(x[0])",
    # attributes and dunders
    'print(().__class__.__bases__[0].__subclasses__())', 'x = 1\nprint(x.__dict__)', 'print(print.__self__)',
    "r = get_time(city='Oslo')\nprint(r.__class__.__mro__)", "r = get_time(city='Oslo')\nprint(r.keys())",
    'print(get_time.__globals__)', 'print([].__class__)', "print('a'.__class__)", "print(__import__('os'))",
    'print(__builtins__)', "print(getattr(x=1, name='__class__'))", 'print(globals())',
    # recursion, loops, exponents and repetition
    'def f():\n    return f()\nf()\nprint(1)', 'import sys\nsys.setrecursionlimit(10)\nprint(1)', "print('a' * 10 ** 9)",
    'print(10 ** 10 ** 10)', 'x = 2 ** 10000000\nprint(x)', 'print([0] * 10 ** 9)', "print(f'{10 ** 10 ** 10}')",
    "print('%s' % 1)",
    'while True:\n    pass\nprint(1)', 'x = [i for i in [1]]\nprint(x)',
    # unknown functions and bad tool calls
    "print(open(file='/etc/passwd'))", "print(exec(code='1'))", "print(eval('1'))",
    "r = get_time(city='Oslo')(1)\nprint(r)", "r = get_time(city='Oslo').city(x=1)\nprint(r)",
    "r = get_time(city=[1, 1])\nprint(r)", "r = get_time(city=b'Oslo')\nprint(r)",
    "r = get_time(**{'city': 'x'})\nprint(r)", "r = get_time(city={'a': [1]})\nprint(r)",
    "r = calculate(expression='² + 1')\nprint(r)",
    "r = calculate(expression='" + '9' * 5_000 + " + 1')\nprint(r)", "r = calculate(expression=1)\nprint(r)",
    "r = get_time(city='Oslo', city='Rome')\nprint(r)",
    # statements and print forms that are not allowed
    'x = [1]\nprint(*x)', "print(1, sep='')", 'print(1)\nprint(2)', 'x: int = 1\nprint(x)', 'x = y = 1\nprint(x)',
    'x, y = [1, 2]\nprint(x)', 'x = 1\nx += 1\nprint(x)', 'print(1) if True else None', 'async def f(): pass\nprint(1)',
    # odd text
    '', '\n\n\n', '# only a comment', 'x = 1\x00\nprint(x)', '\ufeffprint(1)', '\tprint(1)', '\\', "'''", 'print("\\m")\nx',
]


class RandomPrograms:
    "Random programs: token soup, random ASTs (unparsed to source) and mutated corpus programs, from one seeded RNG."
    TOKENS = ['=', '(', ')', '[', ']', '{', '}', ':', ',', '.', '\n', '\n', '**', '*', '+', '-', "'s'", '"Oslo"', '0', '1',
              '10', '1e9', 'print', 'import', 'lambda', 'def', 'for', 'in', 'if', 'else', 'while', 'not', '__class__', '#', '\\',
              "'''", '@', ';', '    ', *NAMES, *ARGUMENTS, *TOOL_NAMES]

    def __init__(self, seed: int): self.rng = random.Random(seed)

    def token_soup(self) -> str:
        return ' '.join(self.rng.choice(self.TOKENS) for _ in range(self.rng.randint(1, 60)))

    def constant(self):
        return self.rng.choice([0, -1, 1.5, True, None, 'Oslo', 'liam', '', 'x' * self.rng.randint(0, 50),
                                10 ** self.rng.randint(1, 40), '² + 1', '3 * 4', b'by', 'é'])

    def expr(self, depth: int, names: list) -> ast.expr:
        "A random expression, allowed kinds most of the time, any kind (binary ops, lambdas, sets, ...) sometimes."
        r, leaf = self.rng.random(), depth <= 0 or self.rng.random() < 0.3
        e = lambda: self.expr(depth - 1, names)
        if leaf: return ast.Name(id=self.rng.choice(names + NAMES)) if names and r < 0.4 else ast.Constant(self.constant())
        if r < 0.2: return ast.List(elts=[e() for _ in range(self.rng.randint(0, 4))])
        if r < 0.35:
            n = self.rng.randint(0, 3)
            return ast.Dict(keys=[e() for _ in range(n)], values=[e() for _ in range(n)])
        if r < 0.55:
            name = self.rng.choice(TOOL_NAMES + ['open', 'print', 'f'])
            keywords = [ast.keyword(arg=self.rng.choice(ARGUMENTS), value=e()) for _ in range(self.rng.randint(0, 3))]
            return ast.Call(func=ast.Name(id=name), args=[e()] if self.rng.random() < 0.1 else [], keywords=keywords)
        if r < 0.7: return ast.Subscript(value=e(), slice=e())
        if r < 0.8: return ast.Attribute(value=e(), attr=self.rng.choice(DUNDERS))
        if r < 0.85: return ast.UnaryOp(op=self.rng.choice([ast.USub(), ast.UAdd(), ast.Not(), ast.Invert()]), operand=e())
        other = [lambda: ast.BinOp(left=e(), op=self.rng.choice([ast.Add(), ast.Mult(), ast.Pow(), ast.Mod()]), right=e()),
                 lambda: ast.Tuple(elts=[e(), e()]), lambda: ast.Set(elts=[e()]),
                 lambda: ast.IfExp(test=e(), body=e(), orelse=e()),
                 lambda: ast.Compare(left=e(), ops=[ast.Lt()], comparators=[e()]),
                 lambda: ast.BoolOp(op=ast.Or(), values=[e(), e()]),
                 lambda: ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                                    body=e()),
                 lambda: ast.ListComp(elt=e(), generators=[ast.comprehension(target=ast.Name(id='i'), iter=e(), ifs=[],
                                                                             is_async=0)]),
                 lambda: ast.Starred(value=e()),
                 lambda: ast.JoinedStr(values=[ast.FormattedValue(value=e(), conversion=-1)])]
        return self.rng.choice(other)()

    def random_ast(self) -> str:
        "A few assignments of random expressions and (usually) a final print, unparsed to source."
        names, body = [], []
        for _ in range(self.rng.randint(0, 6)):
            value = self.expr(self.rng.randint(0, 5), names)
            names.append(self.rng.choice(['a', 'b', 'r', 'x', f'v{len(names)}']))
            body.append(ast.Assign(targets=[ast.Name(id=names[-1])], value=value, lineno=0))
        if self.rng.random() < 0.9:
            args = [self.expr(self.rng.randint(0, 3), names) for _ in range(self.rng.randint(0, 3))]
            body.append(ast.Expr(value=ast.Call(func=ast.Name(id='print'), args=args, keywords=[])))
        return ast.unparse(ast.fix_missing_locations(ast.Module(body=body, type_ignores=[])))

    def mutation(self, source: str) -> str:
        "A corpus program with a few characters or lines deleted, duplicated or replaced."
        for _ in range(self.rng.randint(1, 4)):
            i = self.rng.randrange(len(source) + 1)
            kind = self.rng.randrange(4)
            if kind == 0: source = source[:i] + source[i + 1:]
            elif kind == 1: source = source[:i] + self.rng.choice(self.TOKENS) + source[i:]
            elif kind == 2: source = source[:i] + source[i:][:self.rng.randint(1, 30)] * self.rng.randint(2, 5) + source[i:]
            else: source = '\n'.join(self.rng.choice([line, line, line + '\n' + line, '']) for line in source.split('\n'))
        return source


@pytest.fixture(scope='module')
def episodes() -> list:
    "Corpus episodes with programs: their metadata answers recorded calls, as in evaluation."
    metas = (make_episode(random.Random(s), kind='chain', code_mode=True)['metadata'] for s in range(40))
    return [m for m in metas if m.get('code_text')]


@pytest.mark.parametrize('limits', [LIMITS, TIGHT], ids=['defaults', 'tight'])
def test_adversarial_programs(episodes, limits):
    refused, harmless = ([run_one(source, episodes[0], limits) for source in programs] for programs in (REFUSED, HARMLESS))
    assert all('error' in r for r in refused), [(p[:80], r) for p, r in zip(REFUSED, refused) if 'output' in r]
    errors = ' '.join(r.get('error', '') for r in refused + harmless)
    reasons = ['nests too deeply', 'max_container_size', 'max_program_chars', 'max_output_chars', 'cannot be a dict key',
               'syntax error', 'only allowed on tool results', 'unknown tool', 'ValueError']
    for reason in reasons + (['max_steps'] if limits is TIGHT else []): assert reason in errors, reason
    if limits is LIMITS:  # with the defaults the harmless programs run
        assert all('output' in r for r in harmless), [(p[:80], r) for p, r in zip(HARMLESS, harmless) if 'error' in r]


def test_random_programs(episodes):
    gen, counts = RandomPrograms(seed=17), {'output': 0, 'error': 0}
    for i in range(6_000):
        kind = i % 3
        episode = episodes[i % len(episodes)]
        source = gen.token_soup() if kind == 0 else gen.random_ast() if kind == 1 else gen.mutation(episode['code_text'])
        counts[next(iter(run_one(source, episode)))] += 1
    assert counts['output'] > 150 and counts['error'] > 3_000, counts  # both paths are exercised


def test_corpus_programs_still_run(episodes):
    for m in episodes: assert run_one(m['code_text'], m) == {'output': run_program(m['code_text'], recorded_or_run(m))}


def test_slow_tools_stop_at_the_wall_time_budget():
    limits = CodeModeConfig(max_seconds=0.3)
    slow = lambda name, arguments: time.sleep(0.05) or {'ok': 1}
    result = run_one("r = get_time(city='Oslo')\n" * 100 + 'print(r)', {}, limits, call_tool=slow)
    assert 'max_seconds=0.3' in result['error']
