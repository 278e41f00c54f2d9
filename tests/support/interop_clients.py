"""Interop checks: PyPI clients against `tests/serve_scripted.py --responsive` (not a pytest
module: it needs the clients, which are not project dependencies).

    python tests/serve_scripted.py --responsive --name gpt-oss-20b --port 12040 &
    pip install openai openai-agents litellm langchain-openai "pydantic-ai-slim[openai]"
    python tests/interop_clients.py http://127.0.0.1:12040/v1

Prints PASS/FAIL per check and, last, the results as JSON.
"""
import asyncio
import json
import sys

BASE = sys.argv[1]  # http://127.0.0.1:PORT/v1
MODEL = "gpt-oss-20b"
results = []
def check(client, name):
    def deco(fn):
        try:
            ok, note = fn()
        except Exception as e:
            ok, note = False, f"{type(e).__name__}: {str(e)[:160]}"
        results.append((client, name, ok, note))
        print(("PASS" if ok else "FAIL"), client, "|", name, "|", note, flush=True)
        return fn
    return deco

WEATHER_Q = "What is the weather in Paris?"
def no_markup(s): return s is None or ("<|" not in s and "|>" not in s)

# ---- openai SDK
import openai
oc = openai.OpenAI(base_url=BASE, api_key="x", max_retries=0)
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
FTOOL = {"type": "function", **TOOL["function"]}
@check("openai " + openai.__version__, "chat")
def _():
    r = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    return r.choices[0].message.content == "Hello from oss-mlx.", r.choices[0].finish_reason
@check("openai " + openai.__version__, "chat stream")
def _():
    t = "".join(c.choices[0].delta.content or "" for c in oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True) if c.choices)
    return t == "Hello from oss-mlx.", repr(t)
@check("openai " + openai.__version__, "chat tool loop")
def _():
    msgs = [{"role": "user", "content": WEATHER_Q}]
    r = oc.chat.completions.create(model=MODEL, messages=msgs, tools=[TOOL])
    tc = r.choices[0].message.tool_calls[0]
    msgs += [r.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": tc.id, "content": '{"sky": "sunny"}'}]
    r2 = oc.chat.completions.create(model=MODEL, messages=msgs, tools=[TOOL])
    return json.loads(tc.function.arguments) == {"city": "Paris"} and "sunny" in r2.choices[0].message.content, r.choices[0].finish_reason
@check("openai " + openai.__version__, "responses")
def _():
    r = oc.responses.create(model=MODEL, input="Hi")
    return r.output_text == "Hello from oss-mlx.", r.status
@check("openai " + openai.__version__, "responses stream")
def _():
    ev = list(oc.responses.create(model=MODEL, input="Hi", stream=True))
    return ev[-1].type == "response.completed" and ev[-1].response.output_text == "Hello from oss-mlx.", f"{len(ev)} events"
@check("openai " + openai.__version__, "responses tool loop (stateless)")
def _():
    r = oc.responses.create(model=MODEL, input=WEATHER_Q, tools=[FTOOL])
    call = [o for o in r.output if o.type == "function_call"][0]
    r2 = oc.responses.create(model=MODEL, tools=[FTOOL], input=[{"role": "user", "content": WEATHER_Q}, *[o.model_dump(exclude_none=True) for o in r.output], {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    return "sunny" in r2.output_text, r2.status
@check("openai " + openai.__version__, "responses previous_response_id")
def _():
    r = oc.responses.create(model=MODEL, input=WEATHER_Q, tools=[FTOOL])
    call = [o for o in r.output if o.type == "function_call"][0]
    r2 = oc.responses.create(model=MODEL, tools=[FTOOL], previous_response_id=r.id, input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    return "sunny" in r2.output_text, r2.status
@check("openai " + openai.__version__, "responses encrypted reasoning")
def _():
    r = oc.responses.create(model=MODEL, input="Hi", include=["reasoning.encrypted_content"], store=False)
    return bool(r.output[0].encrypted_content), r.output[0].type

# ---- openai-agents
try:
    import agents
    from agents import Agent, Runner, function_tool, OpenAIResponsesModel, OpenAIChatCompletionsModel, set_tracing_disabled
    set_tracing_disabled(True)
    ac = openai.AsyncOpenAI(base_url=BASE, api_key="x", max_retries=0)
    @function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"
    for label, mk in (("Responses", lambda: OpenAIResponsesModel(model=MODEL, openai_client=openai.AsyncOpenAI(base_url=BASE, api_key="x", max_retries=0))), ("Chat", lambda: OpenAIChatCompletionsModel(model=MODEL, openai_client=openai.AsyncOpenAI(base_url=BASE, api_key="x", max_retries=0)))):
        @check("openai-agents " + agents.__version__ if hasattr(agents, "__version__") else "openai-agents", f"agent tool loop ({label})")
        def _():
            a = Agent(name="w", instructions="Use tools.", tools=[get_weather], model=mk())
            res = asyncio.run(Runner.run(a, WEATHER_Q))
            kinds = [type(i).__name__ for i in res.new_items]
            return "sunny" in res.final_output and "ToolCallItem" in kinds, ",".join(kinds)
except ImportError as e:
    print("skip agents", e)

# ---- litellm
try:
    import litellm
    from importlib.metadata import version
    lv = "litellm " + version("litellm")
    kw = dict(model="openai/" + MODEL, api_base=BASE, api_key="x")
    @check(lv, "completion")
    def _():
        r = litellm.completion(messages=[{"role": "user", "content": "Hi"}], **kw)
        return r.choices[0].message.content == "Hello from oss-mlx.", str(getattr(r.choices[0].message, "reasoning_content", None))
    @check(lv, "completion stream")
    def _():
        t = "".join(c.choices[0].delta.content or "" for c in litellm.completion(messages=[{"role": "user", "content": "Hi"}], stream=True, **kw))
        return t == "Hello from oss-mlx.", repr(t)
    @check(lv, "tool call")
    def _():
        r = litellm.completion(messages=[{"role": "user", "content": WEATHER_Q}], tools=[TOOL], **kw)
        tc = r.choices[0].message.tool_calls[0]
        return json.loads(tc.function.arguments) == {"city": "Paris"}, r.choices[0].finish_reason
    @check(lv, "responses")
    def _():
        r = litellm.responses(input="Hi", **kw)
        return "Hello from oss-mlx." in json.dumps(r.model_dump() if hasattr(r, "model_dump") else r, default=str), type(r).__name__
except ImportError as e:
    print("skip litellm", e)

# ---- langchain-openai
try:
    from importlib.metadata import version
    from langchain_openai import ChatOpenAI
    lc = "langchain-openai " + version("langchain-openai")
    llm = ChatOpenAI(model=MODEL, base_url=BASE, api_key="x", max_retries=0)
    @check(lc, "invoke")
    def _():
        return llm.invoke("Hi").content == "Hello from oss-mlx.", ""
    @check(lc, "stream")
    def _():
        t = "".join(c.content for c in llm.stream("Hi"))
        return t == "Hello from oss-mlx.", repr(t)
    @check(lc, "bind_tools")
    def _():
        m = llm.bind_tools([TOOL]).invoke(WEATHER_Q)
        return m.tool_calls and m.tool_calls[0]["args"] == {"city": "Paris"}, str(m.tool_calls)[:80]
    @check(lc, "Responses API (use_responses_api)")
    def _():
        r = ChatOpenAI(model=MODEL, base_url=BASE, api_key="x", use_responses_api=True, max_retries=0)
        m = r.invoke("Hi")
        return "Hello from oss-mlx." in (m.text() if callable(getattr(m, "text", None)) else str(m.content)), str(m.content)[:80]
    @check(lc, "Responses API bind_tools")
    def _():
        r = ChatOpenAI(model=MODEL, base_url=BASE, api_key="x", use_responses_api=True, max_retries=0)
        m = r.bind_tools([TOOL]).invoke(WEATHER_Q)
        return m.tool_calls and m.tool_calls[0]["args"] == {"city": "Paris"}, str(m.tool_calls)[:80]
except ImportError as e:
    print("skip langchain", e)

# ---- pydantic-ai
try:
    from importlib.metadata import version
    from pydantic_ai import Agent as PAgent
    from pydantic_ai.providers.openai import OpenAIProvider
    import pydantic_ai.models.openai as pm
    pv = "pydantic-ai " + version("pydantic-ai-slim")
    prov = OpenAIProvider(base_url=BASE, api_key="x")
    chat_cls = getattr(pm, "OpenAIChatModel", None) or getattr(pm, "OpenAIModel")
    for label, model in (("Chat", chat_cls(MODEL, provider=prov)), ("Responses", pm.OpenAIResponsesModel(MODEL, provider=prov))):
        @check(pv, f"agent tool loop ({label})")
        def _():
            ag = PAgent(model, instructions="Use tools.")
            @ag.tool_plain
            def get_weather(city: str) -> str:
                """Weather in a city."""
                return "sunny"
            r = ag.run_sync(WEATHER_Q)
            return "sunny" in r.output, r.output[:60]
except ImportError as e:
    print("skip pydantic-ai", e)

print(json.dumps(results))
