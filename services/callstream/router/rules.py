"""Routing rules: which queue a classified ticket or call goes to, read from a YAML file.

    default_queue: general
    confidence_threshold: 0.5        # top intent score under this -> needs_human
    human_triage_queue: human_triage # where low-confidence items go when no rule matches
    rules:
      - name: lost-card
        when: {intent: [card_lost, card_stolen], min_score: 0.3, source_channel: [call, email]}
        queue: cards
        priority: high

Semantics (see `RoutingRules.route`):
- Rules are tried in file order; the first rule whose conditions all hold wins.
- `when.intent` holds when any of the candidate intents (the classifier's top-k, best first) is named in the
  list with a score of at least `min_score`. `min_score` defaults to `confidence_threshold`, so by default a rule
  fires only on a confident intent; a lower value lets urgent intents win even when the model is unsure.
  Without `intent`, `min_score` applies to the top intent's score.
- `when.source_channel` and `when.customer` ({attribute: value or [values]}) compare case-insensitively.
  An empty `when` matches everything (a catch-all).
- `needs_human` is true whenever the top score is under `confidence_threshold`, whichever rule matched.
- No rule matched: `human_triage_queue` if the top score is under the threshold, else `default_queue`;
  the decision's rule is then "default".

Every validation error raises ConfigError naming the file and line, e.g.
"routing_rules.yaml line 7: rule 'lost-card': unknown field 'queeu'".
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from callstream.core.errors import ConfigError

DEFAULT_RULE = "default"
Priority = Literal["low", "normal", "high", "urgent"]


def _as_list(value: Any) -> Any:
    """Allow `intent: card_lost` as well as `intent: [card_lost]` (and `tier: 3` for `tier: ["3"]`)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [str(value)]
    return value


StrList = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_as_list)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleCondition(_Strict):
    intent: StrList | None = None
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    source_channel: StrList | None = None
    customer: dict[str, StrList] | None = None


class Rule(_Strict):
    name: str = Field(min_length=1)
    when: RuleCondition = RuleCondition()
    queue: str = Field(min_length=1)
    priority: Priority = "normal"


class RulesFile(_Strict):
    default_queue: str = Field(min_length=1)
    default_priority: Priority = "normal"
    confidence_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    human_triage_queue: str = Field(default="human_triage", min_length=1)
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for index, rule in enumerate(rules):
            if rule.name in seen:
                # Raised as a plain ValueError at loc ("rules",); the index is recovered in _error_location.
                raise ValueError(f"duplicate rule name {rule.name!r} (rule #{index + 1})")
            seen.add(rule.name)
        return rules


@dataclass(frozen=True)
class RouteDecision:
    queue: str
    priority: str
    rule: str  # the matching rule's name, or "default"
    needs_human: bool
    reason: str


class RoutingRules:
    """Validated routing rules; `route()` picks the queue for one classified item."""

    def __init__(self, spec: RulesFile, source_name: str = "<rules>", rule_lines: Sequence[int] = ()) -> None:
        self.spec = spec
        self.source_name = source_name
        self._rule_lines = list(rule_lines)

    # -- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Path | str) -> RoutingRules:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read routing rules {path}: {exc}") from exc
        return cls.from_text(text, str(path))

    @classmethod
    def from_text(cls, text: str, source_name: str = "<rules>") -> RoutingRules:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f" line {mark.line + 1}" if mark is not None else ""
            problem = " ".join(p for p in (exc.context, exc.problem) if p)
            raise ConfigError(f"{source_name}{line}: YAML syntax error: {problem}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source_name}: YAML error: {exc}") from exc
        if root is None or data is None:
            raise ConfigError(f"{source_name}: empty routing rules file")
        if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
            raise ConfigError(f"{source_name} line {root.start_mark.line + 1}: routing rules must be a mapping")
        try:
            spec = RulesFile.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_error(exc, root, data, source_name)) from exc
        rules_node = _child(root, "rules")
        lines = (
            [n.start_mark.line + 1 for n in rules_node.value]
            if isinstance(rules_node, yaml.SequenceNode)
            else [0] * len(spec.rules)
        )
        return cls(spec, source_name, lines)

    # -- use -------------------------------------------------------------------------------------------------

    @property
    def rules(self) -> list[Rule]:
        return self.spec.rules

    def rule_line(self, name: str) -> int | None:
        for rule, line in zip(self.spec.rules, self._rule_lines, strict=False):
            if rule.name == name:
                return line or None
        return None

    def check_intents(self, labels: Iterable[str]) -> None:
        """Raise ConfigError (file and line) if a rule names an intent that the classifier does not know."""
        known = set(labels)
        for index, rule in enumerate(self.spec.rules):
            unknown = [i for i in rule.when.intent or [] if i not in known]
            if unknown:
                line = self._rule_lines[index] if index < len(self._rule_lines) else 0
                where = f" line {line}" if line else ""
                raise ConfigError(
                    f"{self.source_name}{where}: rule {rule.name!r}: intent(s) {', '.join(map(repr, unknown))} "
                    f"unknown to the classifier (it knows {len(known)} labels)"
                )

    def explain(
        self,
        intents: Sequence[tuple[str, float]],
        source_channel: str = "",
        customer: Mapping[str, str] | None = None,
    ) -> tuple[RouteDecision, list[RuleTrace]]:
        """The decision, and why: each rule tried in order (with its file line) until the first that matches."""
        trace: list[RuleTrace] = []
        for rule, line in zip(self.spec.rules, self._rule_lines + [0] * len(self.spec.rules), strict=False):
            holds, reason = _check(rule.when, intents, source_channel, customer or {}, self.spec.confidence_threshold)
            trace.append(RuleTrace(rule.name, line or None, holds, reason))
            if holds:
                break
        return self.route(intents, source_channel, customer), trace

    def route(
        self,
        intents: Sequence[tuple[str, float]],
        source_channel: str = "",
        customer: Mapping[str, str] | None = None,
    ) -> RouteDecision:
        """Pick the queue for one item; `intents` are (label, score), best first."""
        spec = self.spec
        customer = customer or {}
        top_label, top_score = intents[0] if intents else ("", 0.0)
        needs_human = top_score < spec.confidence_threshold
        low = (
            f"; top intent {top_label or '(none)'} score {top_score:.2f} < threshold {spec.confidence_threshold:.2f}"
            if needs_human
            else ""
        )
        for rule in spec.rules:
            matched = _match(rule.when, intents, source_channel, customer, spec.confidence_threshold)
            if matched is not None:
                return RouteDecision(
                    rule.queue, rule.priority, rule.name, needs_human, f"rule {rule.name!r}: {matched}{low}"
                )
        if needs_human:
            return RouteDecision(
                spec.human_triage_queue, spec.default_priority, DEFAULT_RULE, True, f"no rule matched{low}"
            )
        return RouteDecision(
            spec.default_queue,
            spec.default_priority,
            DEFAULT_RULE,
            False,
            f"no rule matched top intent {top_label} ({top_score:.2f})",
        )


def _match(
    when: RuleCondition,
    intents: Sequence[tuple[str, float]],
    source_channel: str,
    customer: Mapping[str, str],
    threshold: float,
) -> str | None:
    """The reason the condition holds, or None when it does not."""
    holds, reason = _check(when, intents, source_channel, customer, threshold)
    return reason if holds else None


def _check(
    when: RuleCondition,
    intents: Sequence[tuple[str, float]],
    source_channel: str,
    customer: Mapping[str, str],
    threshold: float,
) -> tuple[bool, str]:
    """(True, why it holds) or (False, the first condition that fails and why)."""
    parts: list[str] = []
    min_score = threshold if when.min_score is None else when.min_score
    if when.intent is not None:
        wanted = set(when.intent)
        hit = next(
            (
                (rank, label, score)
                for rank, (label, score) in enumerate(intents)
                if label in wanted and score >= min_score
            ),
            None,
        )
        if hit is None:
            seen = [f"{label} {score:.2f}" for label, score in intents if label in wanted]
            detail = f"candidates scored {', '.join(seen)}" if seen else "none of them among the candidates"
            return False, f"intent not in {sorted(wanted)} with score >= {min_score:.2f} ({detail})"
        rank, label, score = hit
        place = "top intent" if rank == 0 else f"intent #{rank + 1}"
        parts.append(f"{place} {label} score {score:.2f} >= {min_score:.2f}")
    elif when.min_score is not None:
        top_score = intents[0][1] if intents else 0.0
        if top_score < min_score:
            return False, f"top score {top_score:.2f} < min_score {min_score:.2f}"
        parts.append(f"top score {top_score:.2f} >= {min_score:.2f}")
    if when.source_channel is not None:
        channels = {c.casefold() for c in when.source_channel}
        if source_channel.casefold() not in channels:
            return False, f"source_channel {source_channel!r} not in {sorted(when.source_channel)}"
        parts.append(f"source_channel {source_channel!r} in {sorted(when.source_channel)}")
    for key, values in (when.customer or {}).items():
        value = customer.get(key)
        if value is None or value.casefold() not in {v.casefold() for v in values}:
            shown = "missing" if value is None else repr(value)
            return False, f"customer {key} is {shown}, not in {sorted(values)}"
        parts.append(f"customer {key}={value!r}")
    return True, " and ".join(parts) if parts else "matches everything"


@dataclass(frozen=True)
class RuleTrace:
    """One rule's verdict in `RoutingRules.explain`: in file order, up to and including the one that fired."""

    rule: str
    line: int | None
    matched: bool
    reason: str


# -- mapping pydantic errors to YAML lines ---------------------------------------------------------------------


def _child(node: yaml.Node | None, key: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(key, str):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        child: yaml.Node = node.value[key]
        return child
    return None


def _key_node(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k
    return None


def _error_location(loc: tuple[int | str, ...], error_type: str, root: yaml.Node, data: Any) -> tuple[int, str | None]:
    """(1-based line, rule name or None) for a pydantic error location."""
    node: yaml.Node | None = root
    line = root.start_mark.line + 1
    rule_name: str | None = None
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "rules" and isinstance(parts[1], int):
        rules = data.get("rules") if isinstance(data, dict) else None
        if isinstance(rules, list) and parts[1] < len(rules) and isinstance(rules[parts[1]], dict):
            name = rules[parts[1]].get("name")
            rule_name = str(name) if name is not None else f"#{parts[1] + 1}"
        else:
            rule_name = f"#{parts[1] + 1}"
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if last and error_type == "extra_forbidden" and isinstance(part, str):
            key = _key_node(node, part)
            if key is not None:
                line = key.start_mark.line + 1
            break
        child = _child(node, part)
        if child is None:
            break  # e.g. a missing field, or a pydantic-internal loc part such as a union branch: stay at parent
        node = child
        line = node.start_mark.line + 1
    return line, rule_name


def _describe(loc: tuple[int | str, ...], error_type: str, msg: str) -> str:
    in_rule = len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int)
    field = ".".join(str(p) for p in (loc[2:] if in_rule else loc))
    if error_type == "extra_forbidden":
        return f"unknown field {str(loc[-1])!r}"
    if error_type == "missing":
        return f"missing required field {str(loc[-1])!r}"
    msg = msg.removeprefix("Value error, ")
    return f"field {field!r}: {msg}" if field else msg


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model that holds the last element of `loc`, for "did you mean" hints."""
    parent = loc[:-1]
    if parent == ():
        return list(RulesFile.model_fields)
    if len(parent) == 2 and parent[0] == "rules":
        return list(Rule.model_fields)
    if len(parent) == 3 and parent[0] == "rules" and parent[2] == "when":
        return list(RuleCondition.model_fields)
    return []


def _format_error(exc: ValidationError, root: yaml.Node, data: Any, source_name: str) -> str:
    found: list[tuple[int, int, str]] = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        # Duplicate rule names are reported on "rules"; point at the duplicated rule itself.
        if loc == ("rules",) and error["type"] == "value_error" and "rule #" in error["msg"]:
            index = int(error["msg"].rsplit("rule #", 1)[1].rstrip(")")) - 1
            loc = ("rules", index, "name")
        line, rule_name = _error_location(loc, error["type"], root, data)
        prefix = f"rule {rule_name!r}: " if rule_name else ""
        text = _describe(loc, error["type"], error["msg"])
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc), n=1)
            if close:
                text += f" (did you mean {close[0]!r}?)"
        # A misspelt field usually also causes a "missing" error: report the unknown field first.
        found.append(
            (0 if error["type"] == "extra_forbidden" else 1, line, f"{source_name} line {line}: {prefix}{text}")
        )
    messages = [m for _, _, m in sorted(found, key=lambda f: (f[0], f[1]))]
    return messages[0] if len(messages) == 1 else messages[0] + "".join(f"\n  {m}" for m in messages[1:])
