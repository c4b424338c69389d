"""The stages of the recipe, each a function of a config: score (Ray), sft and train (DeepSpeed),
generate, judge, eval, report."""
