"""``distillweb``: a command-line client of distillweb's REST API (standard library only: urllib, json)."""
