"""An example agent plugin: ``shout`` answers with the user's message in capitals.

Install it next to the service (``pip install -e examples/tornado-app-shout``),
then select it with ``agent.backend: shout``. Options go in ``agent.shout``.
"""

from pydantic import BaseModel, ConfigDict

from tornado_app.agents import Agent
from tornado_app.hookspecs import hookimpl


class ShoutOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exclamations: int = 1


class ShoutAgent(Agent):
    model = "shout-1"

    def __init__(self, options: ShoutOptions):
        super().__init__()
        self.options = options

    async def stream(self, request):
        # Yield pieces as they are ready; the host does timing, tokens and transcripts.
        for word in request.messages[-1]["content"].upper().split():
            yield word + " "
        yield "!" * self.options.exclamations


@hookimpl
def register_agents(register):
    register("shout", lambda options, settings: ShoutAgent(options), options=ShoutOptions)
