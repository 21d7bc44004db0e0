"""An upper bound of the tokens a text costs (placeholder: every token is at least one byte)."""


def text_token_bound(text):
    """Never fewer tokens than a byte-level BPE tokenizer counts for ``text``."""
    if isinstance(text, int):
        return text * 4
    return len(str(text).encode("utf-8"))
