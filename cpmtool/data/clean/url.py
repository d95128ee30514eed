"""URL block list, after datatrove v0.10's `URLFilter` (the RefinedWeb rules).

Checks `record["url"]`: the registered domain or the full host on a domain block list, the
exact URL on a URL block list, a banned word among the URL's words, two or more "soft" banned
words, a banned sub-word anywhere in the letters-and-digits of the URL. The word lists in
assets/url/ are datatrove's (Apache-2.0). The UT1 domain/URL lists that datatrove ships are
not copied; pass your own files, or `datatrove_lists: true` to read them from an installed datatrove.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cpmtool.errors import ConfigError, MissingDependencyError

_ASSETS = Path(__file__).parent / "assets" / "url"
_NON_ALNUM = re.compile(r"[^a-zA-Z0-9]+")


def _norm(word: str) -> str:
    return _NON_ALNUM.sub("", word).lower()


def _read_list(path: str | Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"url: cannot read list {path} ({e.strerror or e})") from None
    return [x.strip() for x in lines if x.strip() and not x.startswith("#")]


@dataclass
class UrlConfig:
    """Args:
    domains / urls: files of blocked domains (one per line; a registered domain or a full host) / exact URLs.
    extra_domains / extra_urls: more of the same, inline.
    banned_words / banned_subwords / soft_banned_words: word-list files; default: the bundled lists.
    soft_word_threshold: soft-banned words needed to drop.
    datatrove_lists: also read the UT1 domain and URL block lists from an installed datatrove.
    missing_url: "keep" or "drop" (reason `no_url`) documents without a `url`.
    """

    domains: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    extra_domains: list[str] = field(default_factory=list)
    extra_urls: list[str] = field(default_factory=list)
    banned_words: str | None = None
    banned_subwords: str | None = None
    soft_banned_words: str | None = None
    soft_word_threshold: int = 2
    datatrove_lists: bool = False
    missing_url: str = "keep"


class UrlFilter:
    """Reasons (datatrove's): `domain`, `subdomain`, `url`, `hard_blacklisted`, `soft_blacklisted`,
    `blacklisted_subword`; and `no_url` when `missing_url: drop`."""

    name = "url"

    def __init__(self, cfg: UrlConfig | None = None):
        self.cfg = c = cfg or UrlConfig()
        if c.missing_url not in ("keep", "drop"):
            raise ConfigError(f"url: missing_url must be keep or drop, not {c.missing_url!r}")
        try:
            import tldextract
        except ImportError:
            raise MissingDependencyError("the url stage needs tldextract (pip install tldextract)") from None
        # suffix_list_urls=(): use the public-suffix snapshot inside the package, never the network
        self._extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
        domains = set(c.extra_domains)
        urls = set(c.extra_urls)
        for p in c.domains:
            domains.update(_read_list(p))
        for p in c.urls:
            urls.update(_read_list(p))
        if c.datatrove_lists:
            d, u = _datatrove_lists()
            domains |= d
            urls |= u
        self._domains = frozenset(domains)
        self._urls = frozenset(urls)
        self._banned = self._words(c.banned_words, "banned_words.txt")
        self._soft = self._words(c.soft_banned_words, "soft_banned_words.txt")
        sub = sorted(self._words(c.banned_subwords, "banned_subwords.txt"), key=len, reverse=True)
        self._subwords = re.compile("|".join(map(re.escape, sub))) if sub else None

    @staticmethod
    def _words(path: str | None, default: str) -> frozenset[str]:
        return frozenset(w for w in map(_norm, _read_list(path or _ASSETS / default)) if w)

    def __call__(self, record: dict) -> bool | tuple[bool, str]:
        url = record.get("url")
        if not url or not isinstance(url, str):
            return True if self.cfg.missing_url == "keep" else (False, "no_url")
        return self.check(url)

    def check(self, url: str) -> bool | tuple[bool, str]:
        info = self._extract(url)
        registered = f"{info.domain}.{info.suffix}" if info.domain and info.suffix else ""
        if registered in self._domains:
            return False, "domain"
        if info.fqdn in self._domains:
            return False, "subdomain"
        if url in self._urls:
            return False, "url"
        url_words = set(_NON_ALNUM.split(url))
        if not self._banned.isdisjoint(url_words):
            return False, "hard_blacklisted"
        if len(self._soft.intersection(url_words)) >= self.cfg.soft_word_threshold:
            return False, "soft_blacklisted"
        if self._subwords is not None and self._subwords.search(_norm(url)):
            return False, "blacklisted_subword"
        return True


def _datatrove_lists() -> tuple[set[str], set[str]]:
    try:
        from datatrove.utils._import_utils import ASSETS_PATH
    except ImportError:
        raise MissingDependencyError(
            "url: datatrove_lists needs datatrove (pip install 'cpmtool[datatrove]')"
        ) from None
    domains: set[str] = set()
    urls: set[str] = set()
    with tarfile.open(Path(ASSETS_PATH) / "url_filterblacklistsv0_3_0.tar.gz", "r:gz") as tar:
        for member in tar:
            name = Path(member.name).name
            if name in ("domains", "urls") and member.isfile():
                target = domains if name == "domains" else urls
                target.update(_iter_list(tar.extractfile(member)))
    return domains, urls


def _iter_list(fh) -> Iterable[str]:
    for raw in fh:
        line = raw.decode("utf-8", "replace").strip()
        if line and not line.startswith("#"):
            yield line
