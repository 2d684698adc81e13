"""Configuration: the typed schema and its checks (``schema``), the after-training commands' schemas
(``apps``), the command table (``commands``) and composition for Python callers (``compose``)."""
