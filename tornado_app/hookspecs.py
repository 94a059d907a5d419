"""The hooks a plugin may implement. Project name: ``tornado_app``.

Hooks are called with keyword arguments. A plugin is a module (or object)
with functions marked ``@hookimpl``; built-in plugins live in ``plugins/``,
third-party ones declare an entry point in the group ``tornado_app``.
"""

import pluggy

hookspec = pluggy.HookspecMarker("tornado_app")
hookimpl = pluggy.HookimplMarker("tornado_app")


@hookspec
def register_agents(register):
    """Offer named agent backends.

    Call ``register(name, factory, options=OptionsModel)`` once per backend:

    - ``name``: what ``agent.backend`` (and ``agent.fallbacks``) select.
    - ``options``: a pydantic model for the ``agent.<name>`` config section
      (unknown keys should be forbidden); optional.
    - ``factory(options, settings)``: returns a :class:`tornado_app.agents.Agent`;
      it receives the validated options and the whole Settings. It must be
      quick: slow loading belongs in ``Agent.start()``.

    Returns nothing; it is not awaited.
    """


@hookspec
def register_tools(register):
    """Offer named tools that agents may call (see tornado_app.tools).

    Call ``register(name, factory, options=OptionsModel)`` once per tool:

    - ``name``: what ``agent.tools`` lists to let the agent use the tool; the
      model sees it too, so keep to letters, digits, ``_`` and ``-``.
    - ``options``: a pydantic model for the ``tools.<name>`` config section
      (unknown keys should be forbidden); optional.
    - ``factory(options, settings)``: returns a :class:`tornado_app.tools.Tool`;
      it receives the validated options and the whole Settings, and must be
      quick.

    The host runs the tool's calls (validation, timeout, concurrency, the
    transcript); a tool only sees the calling user's data. Returns nothing;
    it is not awaited.
    """
