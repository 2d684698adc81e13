"""Reward functions for GRPO (online RL with verifiable rewards).

A reward function has TRL's signature, ``f(prompts, completions, completion_ids, **columns) ->
list[float | None]``: one reward per completion, ``None`` for "no opinion". :mod:`.loading` turns the
config's ``rewards`` into :class:`~.loading.RewardFunction` objects (at config time, before any model
loads), :mod:`.calling` calls them on a batch of completions and checks what they return. The built-ins
live one per module: :mod:`.exact_match`, :mod:`.json_valid`, :mod:`.fields_matched`,
:mod:`.format_regex`, :mod:`.length_penalty`.

Nothing is re-exported here, so that importing :mod:`.loading` stays cheap (no torch).
"""
