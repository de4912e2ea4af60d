"""Metric names named by PromQL expressions, and the sample names in a scrape.

PromQL selects series by the name a scrape exposes, so `_bucket`, `_count`, `_sum`, `_total`
and `_info` are part of the name a query uses: `rate(x_total[5m])` needs `x_total` on a
sample line, and `x` alone would select nothing. Both sides are therefore compared as full
sample names; `family()` strips those suffixes where a family-level comparison is wanted.
"""

from __future__ import annotations

import re

# PromQL functions and aggregation operators (Prometheus 2.x/3.x).
_FUNCTIONS_WORDS = """
abs absent absent_over_time acos acosh asin asinh atan atanh avg avg_over_time bottomk
ceil changes clamp clamp_max clamp_min cos cosh count count_over_time count_values
day_of_month day_of_week day_of_year days_in_month deg delta deriv
double_exponential_smoothing end exp floor group histogram_avg histogram_count
histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
holt_winters hour idelta increase info irate label_join label_replace last_over_time
limit_ratio limitk ln log10 log2 mad_over_time max max_over_time min min_over_time
minute month pi predict_linear present_over_time quantile quantile_over_time rad rate
resets round scalar sgn sin sinh sort sort_by_label sort_by_label_desc sort_desc sqrt
start stddev stddev_over_time stdvar stdvar_over_time sum sum_over_time tan tanh time
timestamp topk vector year
"""
FUNCTIONS = frozenset(_FUNCTIONS_WORDS.split())
_KEYWORDS_WORDS = """
by without on ignoring group_left group_right bool and or unless offset atan2 inf nan
"""
KEYWORDS = frozenset(_KEYWORDS_WORDS.split())
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[\w:]+\]\]")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(?<![\w.])\.?\d[\w.]*")
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?=[{ ])")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*$", re.S)
_SUFFIX = re.compile(r"_(?:bucket|count|sum|total|info)$")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects; functions, keywords, label names, label values,
    durations, numbers and Grafana `$variables` are not metric names."""
    if "__name__" in expr:
        raise ValueError(f"select metrics by name, not by __name__ matchers: {expr}")
    text = _STRING.sub('""', expr)
    text = re.sub(r"#[^\n]*", "", text)  # PromQL comments
    text = _VARIABLE.sub("0", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = _GROUPING.sub("", text)
    text = _NUMBER.sub("0", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):
            if word not in FUNCTIONS and word not in KEYWORDS:
                raise ValueError(f"unknown PromQL function {word!r} in: {expr}")
            continue
        if word in KEYWORDS or word in FUNCTIONS:
            continue
        names.add(word)
    return names


def variable_query_names(query: str) -> set[str]:
    """Metric names of a Grafana Prometheus variable query: `label_values(<selector>, label)`,
    `label_values(label)` (no metric) or a plain PromQL expression."""
    match = _LABEL_VALUES.match(query)
    if match:
        return metric_names(match.group(1))
    if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", query):
        return set()
    return metric_names(query)


def sample_names(scrape: str) -> set[str]:
    """The names on a Prometheus text exposition's sample lines."""
    return {m.group(1) for line in scrape.splitlines() if (m := _SAMPLE.match(line))}


def family(name: str) -> str:
    return _SUFFIX.sub("", name)


_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def literal_matchers(expr: str) -> set[tuple[str, str, str]]:
    """(metric, label, value) for each matcher that names literal label values: `l="v"` and
    `l=~"a|b"`; regexes, negations and Grafana variables are left out."""
    found: set[tuple[str, str, str]] = set()
    for metric, body in _SELECTOR.findall(expr):
        if metric in FUNCTIONS or metric in KEYWORDS:
            continue
        for label, op, value in _MATCHER.findall(body):
            if op == "=" and "$" not in value:
                found.add((metric, label, value))
            elif op == "=~" and re.fullmatch(r"\w+(?:\|\w+)*", value):
                found.update((metric, label, v) for v in value.split("|"))
    return found


def label_values(scrape: str) -> set[tuple[str, str, str]]:
    """(sample name, label, value) for every label on every sample line of a scrape."""
    found: set[tuple[str, str, str]] = set()
    for line in scrape.splitlines():
        match = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)\{(.*)\} ", line)
        if match:
            for label, value in re.findall(r'(\w+)="((?:\\.|[^"\\])*)"', match.group(2)):
                found.add((match.group(1), label, value))
    return found
