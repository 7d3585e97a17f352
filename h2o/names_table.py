"""Generated from the registry (h2o.policies) by `python -m h2o.names_generate`: do not edit. The built-in
rules, allocations and rule families for the `h2o` command's check of names before torch is imported
(h2o.names); tests/test_names.py holds it to the registry."""

# NAME: (GRAMMAR, EXAMPLE, the regex of its names: NAME + PATTERN), in registration order (the order
# h2o.parse tries them)
RULES = {
    "full": ("full", "full",
        "full"),
    "streaming": ("streaming_<sinks>_<window>", "streaming_4_252",
        r"streaming_(?P<sinks>\d+)_(?P<window>\d+)"),
    "h2o": ("h2o_<sinks>_<recent>_<budget>[_mean|_sum]", "h2o_4_32_256",
        r"h2o_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)(?:_(?P<score>\w+))?"),
    "tova": ("tova_<sinks>_<recent>_<budget>", "tova_4_32_256",
        r"tova_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)"),
    "a2sf": ("a2sf_<sinks>_<recent>_<budget>_<gamma>", "a2sf_4_32_256_0.95",
        r"a2sf_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)_(?P<gamma>[0-9]*\.?[0-9]+)"),
    "vatp": ("vatp_<sinks>_<recent>_<budget>[_mean|_sum]", "vatp_4_32_256",
        r"vatp_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)(?:_(?P<score>\w+))?"),
    "knorm": ("knorm_<sinks>_<recent>_<budget>", "knorm_4_32_256",
        r"knorm_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)"),
    "keydiff": ("keydiff_<sinks>_<recent>_<budget>", "keydiff_4_32_256",
        r"keydiff_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)"),
    "snapkv": ("snapkv_<sinks>_<recent>_<budget>_<window>[+<rule>]", "snapkv_4_32_256_16",
        r"snapkv_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)_(?P<window>\d+)(?:\+(?P<then>[a-z0-9]+)(?P<rest>.*))?"),
    "caote": ("caote_<sinks>_<recent>_<budget>", "caote_4_32_256",
        r"caote_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)"),
    "vlen": ("vlen_<sinks>_<recent>_<budget>[_mean|_sum]", "vlen_4_32_256",
        r"vlen_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)(?:_(?P<score>\w+))?"),
    "kvzip": ("kvzip_<sinks>_<recent>_<budget>[+<rule>]", "kvzip_4_32_256",
        r"kvzip_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)(?:\+(?P<then>[a-z0-9]+)(?P<rest>.*))?"),
    "kvzap": ("kvzap_<sinks>_<recent>_<budget>[_mlp]", "kvzap_4_32_256",
        r"kvzap_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)(?:_(?P<kind>mlp))?"),
}
# name: (grammar, example), in registration order
ALLOCATIONS = {
    "retrieval": ("retrieval_<share>_<factor>", "retrieval_0.1_4"),
    "induction": ("induction_<share>_<factor>", "induction_0.1_4"),
    "ablation": ("ablation_<share>_<factor>", "ablation_0.1_4"),
    "reconstruction": ("reconstruction_<share>_<factor>", "reconstruction_0.1_4"),
    "adakv": ("adakv_<floor>", "adakv_0.2"),
    "global": ("global_<floor>", "global_0.2"),
    "headkv": ("headkv_<floor>[_<factor>]", "headkv_0.2"),
    "pyramid": ("pyramid_<beta>", "pyramid_20"),
}
# an allocation's name: its word, then its numbers
ALLOCATION_PATTERN = "([a-z][a-z0-9]*)((?:_[0-9.]+)*)"
# h2o.policies.families()
FAMILIES = (
    "streaming", "h2o", "h2o_mean", "h2o_sum", "tova", "a2sf", "vatp", "vatp_mean", "vatp_sum", "knorm", "keydiff",
    "snapkv", "caote", "vlen", "vlen_mean", "vlen_sum", "kvzip", "kvzap", "kvzap_mlp", "recommended",
)
# h2o.policies.decode_rules(): what snapkv_..+<rule> and kvzip_..+<rule> may name
DECODE_RULES = (
    "h2o", "tova", "a2sf", "vatp", "knorm", "keydiff", "caote", "vlen",
)
