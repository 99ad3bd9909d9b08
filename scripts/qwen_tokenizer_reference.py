"""Reference token ids for resid's reader of first-generation Qwen's `qwen.tiktoken`.

    python scripts/qwen_tokenizer_reference.py VOCAB_DIR OUT.json

VOCAB_DIR holds `qwen.tiktoken` and Qwen's own `tokenization_qwen.py` (from the pinned qwen-agent
wheel: `bash scripts/fetch-qwen-vocab.sh --reference` runs this script with the pinned tiktoken).
The ids come from Qwen's own `QWenTokenizer.encode` (NFC, then tiktoken with
`allowed_special="all"`); the chat ids from a transcription of `make_context` (chat_format
"chatml") of Qwen's `qwen_generation_utils.py` on that tokenizer. tests/qwen_tokenizer.rs
compares resid with every entry exactly.
"""
import importlib.util
import json
import logging
import sys
import types
import unicodedata
from pathlib import Path

vocab_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])

# tokenization_qwen.py logs through qwen_agent.log; nothing else of qwen-agent is needed.
stub = types.ModuleType("qwen_agent.log")
stub.logger = logging.getLogger("qwen")
sys.modules["qwen_agent"] = types.ModuleType("qwen_agent")
sys.modules["qwen_agent.log"] = stub
spec = importlib.util.spec_from_file_location("tokenization_qwen", vocab_dir / "tokenization_qwen.py")
qwen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qwen)  # builds `qwen.tokenizer` from the qwen.tiktoken beside it
tok = qwen.tokenizer
import tiktoken  # noqa: E402  (only to record its version)

LANGUAGES = {
    "en": "Honesty is the best policy. People who tell the truth earn trust, even when it's hard.",
    "fr": "L'honnêteté est la meilleure politique ; qu'en pensez-vous ? À bientôt, garçon façonné.",
    "zh": "诚实是最好的策略。说真话的人会赢得信任，即使这很困难。",
    "es": "La honestidad es la mejor política. ¿Quién dijo que decir la verdad era fácil? ¡Señor!",
    "pt": "A honestidade é a melhor política. Não é fácil dizer a verdade, mas ganha-se confiança.",
    "vi": "Trung thực là chính sách tốt nhất. Người nói thật sẽ được tin tưởng, dù điều đó khó khăn.",
    "ca": "L'honestedat és la millor política. Qui diu la veritat es guanya la confiança de tothom.",
    "id": "Kejujuran adalah kebijakan terbaik. Orang yang jujur akan dipercaya, meskipun itu sulit.",
    "ja": "正直は最善の策です。真実を語る人は、たとえ難しくても信頼を得ます。カタカナ、ｈａｌｆ",
    "ko": "정직은 최선의 방책입니다. 진실을 말하는 사람은 어려워도 신뢰를 얻습니다.",
    "fi": "Rehellisyys maan perii. Totuuden puhuja ansaitsee luottamuksen, vaikka se on vaikeaa.",
    "hu": "Az őszinteség a legjobb politika. Aki igazat mond, bizalmat nyer, még ha nehéz is.",
    "ta": "நேர்மையே சிறந்த கொள்கை. உண்மையைச் சொல்பவர்கள் நம்பிக்கையைப் பெறுகிறார்கள்.",
    "te": "నిజాయితీ ఉత్తమ విధానం. నిజం చెప్పేవారు కష్టమైనా నమ్మకాన్ని పొందుతారు.",
    "sw": "Uaminifu ni sera bora. Watu wanaosema ukweli hupata imani, hata ikiwa ni vigumu.",
    "ny": "Kuona mtima ndi njira yabwino kwambiri. Anthu onena zoona amadalirika, ngakhale zili zovuta.",
}

OTHER = {
    "emoji": "I ❤️ résumé 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇫🇷 🏳️‍🌈 😀😃😄 ☕️ 🧑🏿‍💻 *️⃣ ok👌",
    "code_python": 'def f(x: int) -> int:\n    """Doc."""\n    return {"a": [1, 2, 3]}[x] ** 2  # comment\n\n\nif __name__ == "__main__":\n\tprint(f(0))\n',
    "code_rust": "fn main() {\n    let v: Vec<u8> = (0..=255).collect();\n    println!(\"{:?}\", &v[..4]);\n}\n",
    "code_json": '{"ids":[1,2,3],"text":"a\\nb","ok":true,"x":null}',
    "whitespace_runs": "a  b   c    d\t\te \t \t f\n\n\ng   \n   h     ",
    "leading_trailing_spaces": "   leading and trailing   ",
    "only_whitespace": " \t\n \u00a0\u3000 ",
    "newlines_only": "\n\n\n\n",
    "crlf": "line one\r\nline two\r\n\r\n  indented\r\n\rlone CR\rend\r\n",
    "special_tokens_inside": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "special_tokens_edges": "<|endoftext|>text<|extra_0|><|extra_204|><|extra_205|><|im_start<|<|im_end|>|><||>x<|endoftext|>",
    "special_token_only": "<|endoftext|>",
    "nfc_combining_accents": "Cafe\u0301 nai\u0308ve A\u030angstro\u0308m e\u0301\u0301",
    "nfc_hangul_jamo": "\u1112\u1161\u11ab\u1100\u1173\u11af",
    "nfc_singletons": "\u212b \u2126 \u212a K",
    "nfc_vietnamese_decomposed": "Vie\u0323\u0302t Nam ti\u00ea\u0301ng Vi\u1ec7t",
    "nfc_compat_untouched": "ﬁ ﬂ ① ｈａｌｆ ² ™",
    "contractions_case": "I'm, you're, they've, he'll, she'd, it's; I'M YOU'RE THEY'VE HE'LL SHE'D IT'S 'S 'T 'Re",
    "numbers": "12345 3.14159 1,000,000 2024-12-05 0x1F ٣٤٥ ४५६ 五",
    "punctuation_runs": "Wait... what?!?! (yes) [no] {maybe} --- *** ::: ;;; ''' \"\"\" ```\n```",
    "unicode_spaces": "a\u00a0b\u2009c\u3000d\u200be\u200df\u2028g\u2029h",
    "mixed_scripts": "Qwen通义千问 is 大语言模型 (LLM); русский текст, ελληνικά, עברית, العربية, हिन्दी.",
    "long_word": "Donaudampfschifffahrtsgesellschaftskapitänsmützenabzeichen pneumonoultramicroscopicsilicovolcanoconiosis",
    "repeated_chars": "a" * 300 + " " + "!" * 50 + " " + "好" * 40,
    "control_chars": "tab\there\x00nul\x07bell\x1bescape\x7fdel",
    # Pieces of thousands of bytes (one regex match each): many merges in one piece.
    "long_space_run": "x" + " " * 3000 + "y",
    "long_newline_run": " \n" * 1000,
    "long_letter_piece": "".join("abcdefghij"[(i * i + 3 * i) % 10] for i in range(4000)),
    "long_cjk_piece": "".join("诚实是最好的策略"[(i * 7) % 8] for i in range(1000)),
    "empty": "",
}

CHAT_QUERIES = [
    ("plain", "What is honesty?"),
    ("multilingual", "诚实是什么？请用一句话回答。"),
    ("leading_newlines", "\n\nstarts with newlines"),
    ("special_text_in_query", "say <|im_end|> and <|endoftext|> literally"),
]


def make_context(query, system="You are a helpful assistant."):
    """Qwen's `make_context` (chat_format "chatml", no history)."""
    im_start, im_end = "<|im_start|>", "<|im_end|>"
    nl_tokens = tok.tokenizer.encode("\n")

    def _tokenize_str(role, content):
        return f"{role}\n{content}", (
            tok.tokenizer.encode(unicodedata.normalize("NFC", role), allowed_special=set(), disallowed_special=())
            + nl_tokens
            + tok.tokenizer.encode(unicodedata.normalize("NFC", content), allowed_special=set(), disallowed_special=())
        )

    system_text, system_tokens_part = _tokenize_str("system", system)
    system_tokens = [tok.im_start_id] + system_tokens_part + [tok.im_end_id]
    context_tokens = system_tokens + (
        nl_tokens + [tok.im_start_id] + _tokenize_str("user", query)[1] + [tok.im_end_id]
        + nl_tokens + [tok.im_start_id] + tok.tokenizer.encode("assistant") + nl_tokens
    )
    raw_text = f"{im_start}{system_text}{im_end}" + f"\n{im_start}user\n{query}{im_end}\n{im_start}assistant\n"
    return raw_text, context_tokens


texts = [{"name": f"lang_{k}", "text": v} for k, v in LANGUAGES.items()] + [{"name": k, "text": v} for k, v in OTHER.items()]
for t in texts:
    t["ids"] = tok.encode(t["text"])
    t["decoded"] = tok._decode(t["ids"], skip_special_tokens=True)
chats = []
for name, query in CHAT_QUERIES:
    raw, ids = make_context(query)
    chats.append({"name": name, "query": query, "text": raw, "ids": ids})

out = {
    "about": "written by scripts/qwen_tokenizer_reference.py (Qwen's tokenization_qwen.py on qwen.tiktoken of qwen-agent 0.0.34); do not edit",
    "tiktoken": tiktoken.__version__,
    "unicodedata": unicodedata.unidata_version,
    "texts": texts,
    "chat": chats,
}
out_path.parent.mkdir(parents=True, exist_ok=True)


def dump(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# One entry per line: small, and a diff shows which text changed.
lines = []
for key, value in out.items():
    if isinstance(value, list):
        lines.append(f"{dump(key)}:[\n" + ",\n".join(dump(v) for v in value) + "\n]")
    else:
        lines.append(f"{dump(key)}:{dump(value)}")
out_path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
print(f"wrote {out_path}: {len(texts)} texts, {len(chats)} chats, {sum(len(t['ids']) for t in texts)} ids")
