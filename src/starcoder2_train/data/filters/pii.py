"""PII redaction: personal data in file contents replaced by placeholders, counted by kind (`pii_redaction`).

The placeholders are those of BigCode's StarCoder/StarCoder2 pipeline (bigcode-project/bigcode-dataset,
`pii/README.md` and `pii/ner/pii_redaction/utils.py`): `<EMAIL>`, `<KEY>`, `<PASSWORD>`, `<NAME>`, and for an IP
address one of five synthetic private addresses of the same version. The rules are this project's own regexes;
where each comes from:
- email: the shape of BigScience's email regex that bigcode's `pii/utils/emails_ip_addresses_detection.py`
  adapts (local part, @, a dotted domain ending in letters). Our addition: the documentation domains of RFC 2606
  and RFC 6761 (example.com/.net/.org, .example, .test, .invalid, .localhost) are kept: they name nobody;
- ip_address: IPv4 and IPv6 validated by `ipaddress`; kept, as bigcode's redaction keeps them
  (`is_private` and `POPULAR_DNS_SERVERS` there): every address that is not global (private, loopback,
  link-local, the documentation ranges TEST-NET-1/2/3 and 2001:db8::/32, reserved, multicast) and the public
  resolvers below; and, as bigcode's `filter_versions`, an x.x.x.x of single digits unless "dns" or "server" is
  near (a version string). Our addition: a dotted quad after the word "version" or a "v" is kept too, and an
  IPv6 needs three non-empty groups (so `a[1::2]` and `std::max` are no addresses);
- key: bigcode ran detect-secrets (AWS, GitHub, Slack, Stripe, JWT, npm, SendGrid, Twilio, Mailchimp, Discord,
  ... detectors, and high-entropy strings filtered by a gibberish model and hash heuristics). Here: the published
  formats of such tokens (the `TOKEN_FORMATS` below, from each vendor's documentation), PEM private-key blocks,
  and values assigned to a name saying key/secret/token that look random (letters and digits, 16+ characters,
  Shannon entropy ≥ 3 bits per character); a UUID, a hash on a line that says sha/md5/hash/digest/checksum, and
  a templated value are kept, as detect-secrets' filters `is_potential_uuid`, `is_templated_secret` and
  bigcode's `is_hash` keep them. Generic high-entropy strings elsewhere are not redacted (they are mostly hashes);
- password: values assigned to a name saying password/passwd/pwd/pass in code, config and JSON, and the password
  of a URL `scheme://user:password@host`; bigcode found passwords only with its StarPII model;
- name: only a token-classification model can find names (`pii_model_path`, e.g. bigcode/starpii; never
  downloaded here); its NAME, EMAIL, KEY, PASSWORD and IP_ADDRESS entities are redacted beside the rules' spans,
  with bigcode's filters (a name of two words or more, a secret of 4+ characters, a key of 9+), USERNAME and
  AMBIGUOUS ignored.
The same value gets the same replacement everywhere. How often ordinary code is changed (hashes, versions, UUIDs):
measured on this Python's standard library in docs/data_filters.md and tests/test_pii.py.

Cost per worker: about 20 compiled patterns (re caches them; a worker that unpickles a PiiRedactor recompiles
them once) and, with a model, the model itself (StarPII: about 125M parameters, 0.5 GB, loaded once per worker
when first used, on the device transformers' `pipeline` picks).
"""

import hashlib
import ipaddress
import math
import re
from collections import Counter

from starcoder2_train.data.skips import FILES_REDACTED

PLACEHOLDERS = {"email": "<EMAIL>", "key": "<KEY>", "password": "<PASSWORD>", "name": "<NAME>"}
KINDS = ("email", "ip_address", "key", "password", "name")
# Synthetic private addresses that replace a public one (this project's own choice of five of each version).
PRIVATE_IPV4 = ("10.0.12.7", "10.23.4.19", "172.16.40.2", "172.20.9.81", "192.168.77.14")
PRIVATE_IPV6 = ("fd00:1:2:3::7", "fd12:3456:789a::42", "fd3c:9a1::1f", "fd80:4:77::9", "fdaa:bb:cc::2")
# Public DNS resolvers (Google, Cloudflare, Quad9, OpenDNS): addresses everybody writes, nobody's own.
PUBLIC_RESOLVERS = frozenset(
    "8.8.8.8 8.8.4.4 1.1.1.1 1.0.0.1 9.9.9.9 149.112.112.112 208.67.222.222 208.67.220.220 "
    "2001:4860:4860::8888 2001:4860:4860::8844 2606:4700:4700::1111 2606:4700:4700::1001".split()
)
KEPT_EMAIL_DOMAINS = re.compile(r"(?:^|\.)(?:example\.(?:com|net|org)|example|test|invalid|localhost)$", re.I)

# Each pattern starts at a literal or a narrow class, so that a file is scanned at tens of MB/s.
EMAIL_DOMAIN = re.compile(r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})(?![\w-])")
EMAIL_LOCAL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")  # matched on the text before the @
IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")  # then its octets and boundaries are checked
IPV6_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:")
IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:]|\.\w)")
# Published token formats (prefix and alphabet as each vendor documents them), each tried only when its literal
# marker is in the file.
TOKEN_FORMATS = tuple(
    (markers, re.compile(rf"(?:{pattern})(?![\w-])"))  # no lookbehind: a literal start is searched fast
    for markers, pattern in (
        (("AKIA", "ASIA", "ABIA", "ACCA"), r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}"),  # AWS access key id
        (
            ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
            r"gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_\w{22,255}",
        ),
        (("xox",), r"xox[abposr]-[A-Za-z0-9-]{10,250}"),  # Slack tokens
        (("_live_", "_test_"), r"(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,99}"),  # Stripe secret/restricted keys
        (("AIza",), r"AIza[0-9A-Za-z_-]{35}"),  # Google API key
        (("eyJ",), r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),  # JSON Web Token
        (("npm_",), r"npm_[A-Za-z0-9]{36}"),  # npm access token
        (("SG.",), r"SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}"),  # SendGrid API key
        (("SK",), r"SK[0-9a-fA-F]{32}"),  # Twilio API key
        (("-us",), r"[0-9a-f]{32}-us[0-9]{1,2}"),  # Mailchimp API key
        (("hf_",), r"hf_[A-Za-z]{34}"),  # Hugging Face token
        (("sk-",), r"sk-(?:proj-)?[A-Za-z0-9_-]{40,200}"),  # OpenAI API key
        (("glpat-",), r"glpat-[A-Za-z0-9_-]{20}"),  # GitLab personal access token
    )
)
PRIVATE_KEY = re.compile(
    r"-----BEGIN ((?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?)-----"
    r"(.+?)-----END \1-----",
    re.S,
)
# A quoted value after = == : := => (str prefixes b r u allowed), then the name before the operator: a variable,
# attribute, dictionary key or JSON string.
QUOTED_VALUE = re.compile(r"""(?:==|:=|=>|[:=])[ \t]*[bruBRU]{0,2}(["'])([^"'\s\\]{4,200})\1""")
NAME_BEFORE_REVERSED = re.compile(r"""[ \t]*\]?["']?([\w.-]{1,80})""")  # matched on the reversed text before it
# An unquoted value on a line of its own (.env, .ini, YAML, shell; also after a comment mark), for names that
# say password/secret/key/token: only values with a digit or a symbol and none of ( ) [ ] . , ; so that code
# (`password = get_password()`) is not read as one.
BARE_VALUE = re.compile(
    r"""(?m)[ \t]*(?:(?:#|//|--|;)[ \t]*)?(?:export[ \t]+)?([\w-]+)[ \t]*[=:][ \t]*"""
    r"""(?=[^\s'"]*[\d!@#$%^&*+=?~])([^\s'"()\[\].,;#]{4,200})[ \t]*$"""
)  # matched only at the start of a line that holds one of NAME_WORDS
NAME_WORDS = (
    "pass",
    "pwd",
    "secret",
    "key",
    "token",
    "credential",
)  # in every name SECRET_NAME or PASSWORD_NAME takes
SECRET_NAME = re.compile(r"(?:api_?key|secret|token|access_?key|private_?key|credential)", re.I)
PASSWORD_NAME = re.compile(r"(?:password|passwd|passphrase|pwd|^pass$|[_.-]pass$|^pass[_.-])", re.I)
URL_PASSWORD = re.compile(r"://[^\s:/@'\"]{1,64}:([^\s/@'\"]{3,128})@[\w.-]")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
HASH_WORDS = re.compile(r"sha|md5|hash|digest|checksum|fingerprint|crc", re.I)
PLACEHOLDER_VALUES = frozenset("password passwd pass secret changeme xxxx none null true false".split())
# StarPII's labels → kinds; USERNAME and AMBIGUOUS are ignored (bigcode's IGNORE).
MODEL_LABELS = {"NAME": "name", "EMAIL": "email", "KEY": "key", "PASSWORD": "password", "IP_ADDRESS": "ip_address"}


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def looks_random(value: str) -> bool:
    """A secret-like value: 16+ characters mixing letters and digits, high entropy, not a UUID or template."""
    return (
        len(value) >= 16
        and any(c.isdigit() for c in value)
        and any(c.isalpha() for c in value)
        and entropy(value) >= 3.0
        and not UUID.fullmatch(value)
        and not any(mark in value for mark in ("${", "{{", "%(", "<", "*"))
    )


def _line(text: str, position: int) -> str:
    """The line of `text` that holds `position`."""
    end = text.find("\n", position)
    return text[text.rfind("\n", 0, position) + 1 : len(text) if end < 0 else end]


def replacement_ip(address: str) -> str:
    """One of the five private addresses of the same version, chosen by a hash of the address (stable)."""
    pool = PRIVATE_IPV6 if ":" in address else PRIVATE_IPV4
    return pool[hashlib.blake2b(address.encode(), digest_size=2).digest()[0] % len(pool)]


def keep_ip(address: str, text: str, start: int) -> bool:
    """True for an address that is not personal, or not an address (see the module's ip_address rule)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    if not ip.is_global or ip.is_multicast or ip.is_reserved or str(ip) in PUBLIC_RESOLVERS:
        return True
    if ip.version == 6:
        return sum(1 for group in address.split(":") if group) < 3 or not any(c.isdigit() for c in address)
    before = text[max(0, start - 30) : start].lower()
    if before.endswith(("v", "v.")) or "version" in before:
        return True
    context = text[max(0, start - 100) : start + 100].lower()
    return len(address) == 7 and "dns" not in context and "server" not in context


def rule_spans(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, kind, replacement) of everything the rules find in `text`, possibly overlapping."""
    spans = []
    if "@" in text:
        for match in EMAIL_DOMAIN.finditer(text):
            local = EMAIL_LOCAL.search(text, max(0, match.start() - 64), match.start())
            if local and not KEPT_EMAIL_DOMAINS.search(match.group(1)) and not _in_url(text, local.start()):
                spans.append((local.start(), match.end(), "email", PLACEHOLDERS["email"]))
    for match in IPV4.finditer(text):
        start, end = match.span()
        if _is_ipv4(text, start, end) and not keep_ip(match.group(), text, start):
            spans.append((start, end, "ip_address", replacement_ip(match.group())))
    if IPV6_HINT.search(text):
        for match in IPV6.finditer(text):
            if not keep_ip(match.group(), text, match.start()):
                spans.append((match.start(), match.end(), "ip_address", replacement_ip(match.group())))
    for markers, pattern in TOKEN_FORMATS:
        if any(marker in text for marker in markers):
            for match in pattern.finditer(text):
                before = text[match.start() - 1 : match.start()]
                if not (before.isalnum() or before in ("_", "-")) or not before:
                    spans.append((match.start(), match.end(), "key", PLACEHOLDERS["key"]))
    if "-----BEGIN" in text:
        for match in PRIVATE_KEY.finditer(text):
            spans.append((match.start(2), match.end(2), "key", PLACEHOLDERS["key"]))
    assignments = []
    for match in QUOTED_VALUE.finditer(text):
        name = _name_before(text, match.start())
        if name:
            assignments.append((name, match.group(2), match.start(2), match.end(2)))
    for line_start in _lines_holding(text, NAME_WORDS):
        match = BARE_VALUE.match(text, line_start)
        if match:
            assignments.append((match.group(1), match.group(2), match.start(2), match.end(2)))
    for name, value, start, end in assignments:
        if PASSWORD_NAME.search(name.rsplit(".", 1)[-1]) and _is_password(value, name):
            spans.append((start, end, "password", PLACEHOLDERS["password"]))
        elif SECRET_NAME.search(name) and looks_random(value) and not _is_hash(value, text, start):
            spans.append((start, end, "key", PLACEHOLDERS["key"]))
    if "://" in text:
        for match in URL_PASSWORD.finditer(text):
            if _is_password(match.group(1), ""):
                spans.append((match.start(1), match.end(1), "password", PLACEHOLDERS["password"]))
    return spans


def _in_url(text: str, position: int) -> bool:
    """True when `position` follows `scheme://user:` in the same word: the password of a URL, not an email."""
    word_start = max(text.rfind(c, 0, position) for c in " \t\n'\"") + 1
    return text[position - 1 : position] == ":" and "://" in text[word_start:position]


def _name_before(text: str, position: int) -> str | None:
    """The variable, attribute, key or JSON string that ends just before `position` (an operator), or None."""
    reversed_window = text[max(0, position - 84) : position][::-1]
    match = NAME_BEFORE_REVERSED.match(reversed_window)
    name = match.group(1)[::-1] if match else None
    return name if name and (name[0].isalpha() or name[0] == "_") else None


def _lines_holding(text: str, words) -> list[int]:
    """The start of every line of `text` that holds one of `words` (any case), in order (str.find is fast)."""
    lowered, starts = text.lower(), set()
    for word in words:
        position = lowered.find(word)
        while position >= 0:
            starts.add(lowered.rfind("\n", 0, position) + 1)
            next_line = lowered.find("\n", position)
            position = -1 if next_line < 0 else lowered.find(word, next_line)
    return sorted(starts)


def _is_ipv4(text: str, start: int, end: int) -> bool:
    """A dotted quad of octets 0-255 without leading zeros, not inside a longer dotted number or a word."""
    octets = text[start:end].split(".")
    if any(int(octet) > 255 or (len(octet) > 1 and octet[0] == "0") for octet in octets):
        return False
    before, after = text[start - 1 : start], text[end : end + 2]
    return not (before and (before.isalnum() or before in "._")) and not (
        after[:1].isalnum() or after[:1] == "_" or (after[:1] == "." and after[1:2].isdigit())
    )


def _is_password(value: str, name: str) -> bool:
    lowered = value.lower()
    return (
        len(set(value)) > 1  # "****", "xxxx"
        and lowered not in PLACEHOLDER_VALUES
        and "password" not in lowered
        and lowered != name.lower()
        and not value.startswith(("/", "~", "./", "../"))  # a path ($PWD is the working directory)
        and not any(mark in value for mark in ("${", "{", "%(", "%s", "<", "$"))
    )


def _is_hash(value: str, text: str, start: int) -> bool:
    """bigcode's `is_hash`: a hex value of a digest's length on a line that speaks of hashes."""
    hex_digest = len(value) in (32, 40, 56, 64, 96, 128) and all(c in "0123456789abcdefABCDEF" for c in value)
    return hex_digest and bool(HASH_WORDS.search(_line(text, start)))


def apply_spans(text: str, spans) -> tuple[str, Counter]:
    """`text` with the spans replaced (of overlapping spans the one starting first, then the longest), and the
    replaced spans counted by kind. The same value gets the same replacement wherever it occurs."""
    counts, pieces, end, chosen = Counter(), [], 0, {}
    for start, stop, kind, replacement in sorted(spans, key=lambda span: (span[0], -span[1])):
        if start < end:
            continue
        value = text[start:stop]
        replacement = chosen.setdefault(value, replacement)
        pieces += [text[end:start], replacement]
        counts[kind] += 1
        end = stop
    return "".join(pieces) + text[end:], counts


class ModelDetector:
    """A token-classification model (e.g. StarPII) by local path, loaded in each worker when first used."""

    def __init__(self, path: str, chunk_chars: int = 1500, min_score: float = 0.5):
        self.path, self.chunk_chars, self.min_score = path, chunk_chars, min_score
        self._pipeline = None

    def __getstate__(self):  # the model never travels to a worker; each worker loads it
        return {key: value for key, value in self.__dict__.items() if key != "_pipeline"} | {"_pipeline": None}

    def _load(self):
        if self._pipeline is None:
            from transformers import pipeline

            self._pipeline = pipeline("token-classification", model=self.path, aggregation_strategy="simple")
        return self._pipeline

    def spans(self, text: str) -> list[tuple[int, int, str, str]]:
        spans, start = [], 0
        for chunk in _chunks(text, self.chunk_chars):
            for entity in self._load()(chunk):
                kind = MODEL_LABELS.get(entity["entity_group"])
                begin, end = start + entity["start"], start + entity["end"]
                value = text[begin:end].strip()
                if kind is None or entity["score"] < self.min_score or len(value) <= 3:
                    continue
                if (kind == "name" and len(value.split()) < 2) or (kind == "key" and len(value) <= 8):
                    continue
                if kind == "ip_address":
                    if keep_ip(value, text, begin):
                        continue
                    spans.append((begin, end, kind, replacement_ip(value)))
                else:
                    spans.append((begin, end, kind, PLACEHOLDERS[kind]))
            start += len(chunk)
        return spans


def _chunks(text: str, size: int):
    """Pieces of at most about `size` characters, cut after a newline where there is one."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


class PiiRedactor:
    """The rules, and a model when `model_path` is given: `redact(text) -> (text, counts by kind)`."""

    def __init__(self, model_path: str | None = None):
        self.model = ModelDetector(model_path) if model_path else None

    def redact(self, text: str) -> tuple[str, Counter]:
        spans = rule_spans(text)
        if self.model is not None:
            spans += self.model.spans(text)
        return apply_spans(text, spans) if spans else (text, Counter())


def redact_files(files: list[dict], redactor: PiiRedactor) -> Counter:
    """Redact each file's content in place; the spans replaced by kind, and FILES_REDACTED the files changed."""
    counts = Counter()
    for file in files:
        text, found = redactor.redact(file["content"])
        if found:
            file["content"] = text
            counts.update(found)
            counts[FILES_REDACTED] += 1
    return counts
