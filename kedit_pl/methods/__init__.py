"""Editing methods: the `EditMethod` base class and one module per method (`conf/method/<name>.yaml` names its
class)."""
