"""Gemma tokenizers (sentencepiece), streaming detokenization and the Gemma chat template.

Gemma 1 ships a real `tokenizer.model`; load it with `Tokenizer.from_file`. A Gemma 3 GGUF carries
no `tokenizer.model`, only llama.cpp's metadata arrays (`tokenizer.ggml.tokens` / `.scores` /
`.token_type` and the special ids), so `Tokenizer.from_gguf` rebuilds a sentencepiece `ModelProto`
from them: BPE, byte fallback, identity normalizer, no dummy prefix, whitespace escaped to `▁`.
Two details make it match transformers' GGUF tokenizer id for id:

- llama.cpp writes whitespace-only user-defined pieces with real spaces (`"  "`); sentencepiece
  matches user-defined pieces in the *escaped* text, so the spaces go back to `▁`.
- Control pieces are never matched in text by sentencepiece, but transformers matches them as
  special tokens; so control pieces with id >= 4 (`<start_of_turn>`, `<unused0>`, ...) become
  user-defined. Ids 0..3 (`<pad>`, `<eos>`, `<bos>`, `<unk>`) stay special, so a literal
  `"<bos>"` in user text stays text here (transformers would turn it into the id).

The GGUF also marks `<unk>` CONTROL rather than UNKNOWN; we give it back its type so sentencepiece
knows its unk id (byte fallback means it is never produced by encoding anyway).

A GGUF path is read with `gguf_file.read_metadata` (only the `tokenizer.*` keys, ~1 s; the `gguf`
package's reader takes ~14 s on this file).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_jax.gguf_file import read_metadata

SPACE = "\u2581"  # sentencepiece's escaped space, "▁"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# gguf token types == sentencepiece piece types: 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


class Tokenizer:
    """A thin wrapper over `sentencepiece.SentencePieceProcessor` with Gemma's special ids."""

    def __init__(self, processor: spm.SentencePieceProcessor):
        self.sp = processor

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a sentencepiece `tokenizer.model` (Gemma 1 / HF / Kaggle)."""
        processor = spm.SentencePieceProcessor()
        processor.Load(os.fspath(path))
        return cls(processor)

    @classmethod
    def from_model_proto(cls, proto: bytes) -> Tokenizer:
        """Load a serialized sentencepiece `ModelProto`."""
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(proto)
        return cls(processor)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Rebuild the tokenizer from the `tokenizer.*` metadata of a GGUF file."""
        fields = read_metadata(path, prefix="tokenizer.")
        return cls.from_model_proto(gguf_model_proto(fields).SerializeToString())

    # -- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def start_of_turn_id(self) -> int:
        return self.piece_to_id(START_OF_TURN)

    @property
    def end_of_turn_id(self) -> int:
        return self.piece_to_id(END_OF_TURN)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`; KeyError if the vocabulary has no such piece (no silent `<unk>`)."""
        token_id = self.sp.PieceToId(piece)
        if not 0 <= token_id < self.vocab_size or self.sp.IdToPiece(token_id) != piece:
            raise KeyError(f"piece {piece!r} is not in the vocabulary")
        return token_id

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control ids (bos/eos/pad) decode to nothing."""
        return self.sp.DecodeIds([int(i) for i in ids])


# -- GGUF -> sentencepiece ------------------------------------------------------------------------
def gguf_model_proto(fields: Mapping[str, Any]) -> sp_pb2.ModelProto:
    """A sentencepiece BPE `ModelProto` from the `tokenizer.*` metadata of a llama.cpp GGUF."""
    model = fields.get("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"expected a sentencepiece ('llama') GGUF tokenizer, got {model!r}")
    tokens = list(fields["tokenizer.ggml.tokens"])
    scores = np.asarray(fields["tokenizer.ggml.scores"], dtype=np.float32)
    types = np.asarray(fields["tokenizer.ggml.token_type"], dtype=np.int64)
    if not len(tokens) == len(scores) == len(types):
        raise ValueError("GGUF tokenizer arrays differ in length")

    proto = sp_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.unk_id = int(fields.get("tokenizer.ggml.unknown_token_id", 3))
    trainer.bos_id = int(fields.get("tokenizer.ggml.bos_token_id", 2))
    trainer.eos_id = int(fields.get("tokenizer.ggml.eos_token_id", 1))
    trainer.pad_id = int(fields.get("tokenizer.ggml.padding_token_id", 0))
    for token_id, (piece, score, kind) in enumerate(zip(tokens, scores.tolist(), types.tolist())):
        if kind == _USER_DEFINED and " " in piece and not piece.strip():
            piece = piece.replace(" ", SPACE)  # llama.cpp stores "▁▁" as real spaces
        if token_id == trainer.unk_id:
            kind = _UNKNOWN  # Gemma 3 GGUFs mark `<unk>` CONTROL; sentencepiece then has no unk at all
        elif kind == _CONTROL and token_id >= 4:
            kind = _USER_DEFINED  # match `<start_of_turn>` etc. inside text, like transformers
        proto.pieces.add(piece=piece, score=score, type=kind)

    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.unk_piece, trainer.bos_piece = tokens[trainer.unk_id], tokens[trainer.bos_id]
    trainer.eos_piece, trainer.pad_piece = tokens[trainer.eos_id], tokens[trainer.pad_id]

    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


# -- streaming detokenization ---------------------------------------------------------------------
class IncrementalDecoder:
    """Turns a stream of ids into text pieces that never split a UTF-8 character, in O(1) per id.

    `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)`, exactly. As with the
    prefix / read offsets of TGI and vLLM, it keeps two short runs of ids: `_prefix`, the ids of the
    last piece emitted, kept as context, and `_pending`, the ids not emitted yet. A push decodes
    `_prefix + _pending` up to the last id whose text is final and emits what that adds to the
    decoded `_prefix`; the emitted ids then become the new `_prefix`. Each push decodes a few ids,
    not the whole text.

    Sentencepiece's decode is final at every cut except inside a UTF-8 character spelled by
    byte-fallback ids (`<0xF0><0x9F>...`): the trailing bytes of a character that later bytes could
    still complete (at most 3 ids) are held back until it completes, or until a non-byte id or
    `flush()` settles them as U+FFFD, as `decode` does. Invalid bytes that nothing can complete are
    emitted at once. The prefix keeps the leading-space rule right: with `add_dummy_prefix`, decode
    drops the "▁" of the first piece only while nothing has produced text yet, and a prefix that
    produced text in context is past that point on its own too. Control ids (bos, eos, pad) decode
    to nothing and, with nothing pending, settle nothing, so they are skipped.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._prefix: list[int] = []  # ids of the last emitted piece (context for the next decode)
        self._prefix_text = ""  # tokenizer.decode(self._prefix)
        self._pending: list[int] = []  # ids not emitted yet

    def push(self, token_id: int) -> str:
        """Append one id; returns the text that is now final (maybe "")."""
        token_id = int(token_id)
        if not self._pending and self.tokenizer.sp.IsControl(token_id):
            return ""
        self._pending.append(token_id)
        cut = len(self._pending) - self._incomplete_tail()
        return self._emit(cut) if cut else ""

    def flush(self) -> str:
        """Everything not yet emitted, including held-back bytes (as U+FFFD, like decode)."""
        return self._emit(len(self._pending)) if self._pending else ""

    def _emit(self, cut: int) -> str:
        text = self.tokenizer.decode(self._prefix + self._pending[:cut])
        piece = text[len(self._prefix_text) :]
        self._prefix, self._pending = self._pending[:cut], self._pending[cut:]
        self._prefix_text = self.tokenizer.decode(self._prefix)
        return piece

    def _incomplete_tail(self) -> int:
        """How many trailing pending ids are bytes that begin a UTF-8 character still incomplete."""
        for back in range(1, min(3, len(self._pending)) + 1):
            token_id = self._pending[-back]
            if not self.tokenizer.sp.IsByte(token_id):
                return 0
            byte = int(self.tokenizer.sp.IdToPiece(token_id)[3:5], 16)  # "<0xF0>" -> 0xF0
            if byte & 0xC0 == 0x80:
                continue  # a continuation byte: look further back for its lead byte
            length = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF8 else 0
            return back if back < length else 0
        return 0


# -- chat template --------------------------------------------------------------------------------
class ChatTemplateError(ValueError):
    """The messages do not fit Gemma's chat format."""


_ROLES = {"user": "user", "model": "model", "assistant": "model"}


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # [{"type": "text", "text": ...}, ...] as in Gemma 3's template
        parts = []
        for item in content:
            if not (isinstance(item, Mapping) and item.get("type") == "text" and isinstance(item.get("text"), str)):
                raise ChatTemplateError(f"unsupported content part {item!r}: only text parts are supported")
            parts.append(item["text"].strip())
        return "".join(parts)
    raise ChatTemplateError(f"message content must be a string, got {type(content).__name__}")


def format_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Gemma's chat template, as text without the leading BOS (`encode` adds it as an id).

    Each turn is `<start_of_turn>{role}\\n{content.strip()}<end_of_turn>\\n`, roles `user`/`model`
    (`assistant` is `model`), alternating and starting with `user`. Gemma has no system role: as in
    the official Gemma 3 template, a leading `system` message is prepended to the first user turn as
    `{system}\\n\\n{user text}` (system text not stripped). A system message with no user turn after
    it becomes a user turn of its own, `{system}\\n\\n`. Ends with `<start_of_turn>model\\n` when
    `add_generation_prompt`.
    """
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    system = None
    if messages[0].get("role") == "system":
        system = _content(messages[0])
        messages = messages[1:] or [{"role": "user", "content": ""}]
    out = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            raise ChatTemplateError("a system message is only allowed as the first message")
        if role not in _ROLES:
            raise ChatTemplateError(f"unknown role {role!r}: expected user, model (or assistant), system")
        if (_ROLES[role] == "user") != (index % 2 == 0):
            raise ChatTemplateError("Conversation roles must alternate user/model/user/model/...")
        text = _content(message).strip()
        if index == 0 and system is not None:
            text = f"{system}\n\n{text}"
        out.append(f"{START_OF_TURN}{_ROLES[role]}\n{text}{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


def format_prompt(prompt: str) -> str:
    """The default scoped prompt: one user turn plus the generation prompt."""
    return format_chat([{"role": "user", "content": prompt}])


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """`[bos] + encode(format_chat(messages))`."""
    return [tokenizer.bos_id, *tokenizer.encode(format_chat(messages), add_bos=False)]
