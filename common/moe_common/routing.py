"""The rules of DeepSeek-V3's group-limited routing that any model shape must keep.

A token's gate scores the `n_group` groups of `n_routed_experts / n_group` experts by the sum of
each group's top-2 scores, keeps the best `topk_group` groups and picks its `num_experts_per_tok`
experts inside them. The operator's API (its CEL rules and pydantic model), the planner and the
worker's `ModelArgs` all check a shape with `routing_errors`, so they cannot drift apart.
"""

from __future__ import annotations


def routing_errors(n_routed_experts: int, n_group: int, topk_group: int,
                   num_experts_per_tok: int) -> list[tuple[str, str]]:
    """(field, message) for every rule the numbers break, fields in Hugging Face's snake_case;
    empty when the shape can route. The numbers are positive integers (checked by the caller)."""
    errors: list[tuple[str, str]] = []
    if n_routed_experts % n_group:
        errors.append(("n_group", f"n_group ({n_group}) must divide n_routed_experts ({n_routed_experts})"))
    if topk_group > n_group:
        errors.append(("topk_group", f"topk_group ({topk_group}) must be <= n_group ({n_group})"))
    if errors and errors[0][0] == "n_group":
        return errors  # the rules below need whole groups
    per_group = n_routed_experts // n_group
    if n_group > 1 and per_group < 2:
        errors.append(("n_group", f"n_routed_experts / n_group = {per_group}: a group's score sums its top-2 "
                                  "experts, so each group needs at least 2 (or n_group 1)"))
    if num_experts_per_tok > topk_group * per_group:
        errors.append(("num_experts_per_tok", f"num_experts_per_tok ({num_experts_per_tok}) must be <= the "
                                              f"experts in topk_group ({topk_group}) groups of {per_group}"))
    return errors


# The same rules as CEL over the CRD's camelCase architecture fields (`api.Architecture`); a test
# checks that they agree with `routing_errors` on every small shape.
CEL_RULES: tuple[tuple[str, str, str], ...] = (
    # (rule, message, field)
    ("self.nRoutedExperts % self.nGroup == 0", "nGroup must divide nRoutedExperts", "nGroup"),
    ("self.topkGroup <= self.nGroup", "topkGroup must be <= nGroup", "topkGroup"),
    ("self.nGroup == 1 || self.nRoutedExperts % self.nGroup != 0 || self.nRoutedExperts / self.nGroup >= 2",
     "nRoutedExperts / nGroup must be >= 2 (a group's score sums its top-2 experts) unless nGroup is 1", "nGroup"),
    ("self.nRoutedExperts % self.nGroup != 0 || "
     "self.numExpertsPerTok <= (self.nRoutedExperts / self.nGroup) * self.topkGroup",
     "numExpertsPerTok must be <= (nRoutedExperts / nGroup) * topkGroup: the top-k experts are chosen "
     "inside topkGroup groups", "numExpertsPerTok"),
)
