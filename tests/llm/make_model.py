"""Writes the tiny model the tests of the `openai` engine serve: a llama-architecture GGUF
file with random weights (64 dimensions, 2 layers, 4 heads, feed-forward 128, context 512,
F32, about half a megabyte) that llama.cpp loads and runs on CPU in milliseconds.

    python make_model.py OUT.gguf

Its text means nothing, but it is deterministic: the seed is fixed, so the file is the same
byte for byte on every run, and greedy decoding (temperature 0) gives the same text for the
same prompt. The output layer is biased so that the model only ever writes the ordinary
pieces of its vocabulary (printable ASCII and a few words): never a raw byte (the text is
always valid UTF-8), never a control token, and never end-of-sequence, so a completion
always runs to `max_tokens` and ends with finish_reason "length" (a stop sequence ends it
earlier).

The vocabulary is a sentencepiece ("llama") one: <unk>, <s>, </s>, the 256 byte tokens
<0x00>..<0xFF> (llama.cpp looks up the newline byte), the ChatML markers, then the printable
ASCII characters and some words with every prefix of each (the tokenizer builds a piece by
merging pairs, so each step must be a piece itself). The chat template is ChatML, so the
server does not fall back to the llama-2 format.

Needs the `gguf` package (and numpy, which it brings); scripts/llm-server.sh installs both.
"""

import sys

import numpy as np
import gguf

SEED = 20240601
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 4
HEAD_DIM = N_EMBD // N_HEAD  # 16, all of it rotated
N_FF = 128
N_CTX = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = [
    "the", "a", "and", "of", "to", "in", "is", "it", "you", "that", "for", "on", "with",
    "hi", "hello", "world", "cat", "dog", "job", "task", "queue", "model", "tiny", "word",
    "time", "one", "two", "three", "yes", "no", "good", "day", "night", "light",
]

SPACE = "\u2581"  # sentencepiece's mark for a space


def vocabulary():
    """(pieces, scores, types, allowed): allowed says which pieces the model may write."""
    pieces = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for b in range(256):
        pieces.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
    for marker in ("<|im_start|>", "<|im_end|>"):
        pieces.append(marker)
        types.append(gguf.TokenType.CONTROL)
    specials = len(pieces)

    ordinary = [SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    for word in WORDS:
        for end in range(1, len(word) + 1):
            ordinary.append(SPACE + word[:end])
        for end in range(2, len(word) + 1):
            ordinary.append(word[:end])
    seen = set(pieces)
    for piece in ordinary:
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
            types.append(gguf.TokenType.NORMAL)

    # The tokenizer merges the pair whose piece scores highest first: longer pieces win.
    scores = [0.0] * specials + [
        float(len(p)) - 100.0 - i * 1e-4 for i, p in enumerate(pieces[specials:])
    ]
    allowed = [t == gguf.TokenType.NORMAL for t in types]
    return pieces, scores, [int(t) for t in types], allowed


def tensors(n_vocab, allowed):
    """The weights, as numpy arrays in row-major order: the shape of each is ggml's ne
    reversed (token_embd.weight has ne = [n_embd, n_vocab], so shape (n_vocab, n_embd))."""
    rng = np.random.default_rng(SEED)

    def normal(shape, std):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    out = {}
    # Channel 0 of the residual stream is a constant: every embedding has it, and no layer
    # writes to it (row 0 of attn_output and ffn_down is zero). After the final norm it is a
    # positive number, so column 0 of the output layer acts as a bias per token.
    embd = normal((n_vocab, N_EMBD), 1.0)
    embd[:, 0] = 8.0
    out["token_embd.weight"] = embd
    for layer in range(N_LAYER):
        p = f"blk.{layer}."
        out[p + "attn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        out[p + "attn_q.weight"] = normal((N_HEAD * HEAD_DIM, N_EMBD), 0.25)
        out[p + "attn_k.weight"] = normal((N_HEAD_KV * HEAD_DIM, N_EMBD), 0.25)
        out[p + "attn_v.weight"] = normal((N_HEAD_KV * HEAD_DIM, N_EMBD), 0.25)
        attn_out = normal((N_EMBD, N_HEAD * HEAD_DIM), 0.1)
        attn_out[0, :] = 0.0
        out[p + "attn_output.weight"] = attn_out
        out[p + "ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        out[p + "ffn_gate.weight"] = normal((N_FF, N_EMBD), 0.25)
        out[p + "ffn_up.weight"] = normal((N_FF, N_EMBD), 0.25)
        down = normal((N_EMBD, N_FF), 0.1)
        down[0, :] = 0.0
        out[p + "ffn_down.weight"] = down
    out["output_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    head = normal((n_vocab, N_EMBD), 0.5)
    head[:, 0] = np.where(np.array(allowed), 0.0, -10.0).astype(np.float32)
    out["output.weight"] = head
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python make_model.py OUT.gguf")
    path = sys.argv[1]
    pieces, scores, types, allowed = vocabulary()

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("gantry-tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(pieces))

    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    for name, array in tensors(len(pieces), allowed).items():
        w.add_tensor(name, array)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
