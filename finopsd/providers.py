"""Provider prefixes on model names: ``openai/gpt-4o`` is model ``gpt-4o`` of provider ``openai``.

Gateways name a model with its provider in front, the way LiteLLM routes it
(``openai/gpt-4o``, ``anthropic/claude-sonnet-4-5``, ``azure/my-deployment``,
``bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0``), and not always
consistently: LiteLLM's payload for a response-cache hit or a failed call keeps
the prefix its payload for the same model's successful call has dropped. So
that one model is one model in the store and the analyzers, ``split_provider``
is applied to every usage event, whatever its input format: ``UsageEvent``
strips the prefix from ``request_model`` and ``response_model`` (and the batch
decoder does the same to each distinct name of a batch with this function).

Only the first ``/``-separated segment is looked at, and only a name in
``PROVIDER_PREFIXES`` is a prefix: ``meta-llama/Llama-3.1-8B-Instruct`` (a
Hugging Face repository, as vLLM serves it) keeps its name, and
``openrouter/anthropic/claude-3.5-sonnet`` becomes ``anthropic/claude-3.5-sonnet``
(OpenRouter's own model id). The prefix names the provider only where the event
names none: a named ``gen_ai.provider.name`` is kept as sent.
"""

from __future__ import annotations

PROVIDER_PREFIXES: frozenset[str] = frozenset(
    """
    a2a a2a_agent abliteration ai21 ai21_chat aiand aiml aiohttp_openai amazon_nova
    anthropic anthropic_text apertis assemblyai auto_router aws_polly aws_textract azure
    azure_ai azure_speech azure_text baseten bedrock bedrock_mantle bespoke bigmodel
    black_forest_labs bytez cerebras charity_engine chatgpt chutes clarifai
    clf_ai_gateway cloudflare codestral cognition cohere cohere_chat cometapi
    compactifai coralbricks cortecs cursor custom custom_openai darkbloom dashscope
    databricks databricks_agent datarobot deepgram deepinfra deepseek
    docker_model_runner dotprompt edenai elevenlabs empiriolabs empower eu_jev fal_ai
    featherless_ai fireworks_ai friendliai galadriel gdc gemini gigachat github
    github_copilot gradient_ai groq helicone heroku hosted_vllm hostinger_router
    huggingface humanloop hyperbolic inception inferenceapis infinity jina_ai kyma
    lambda_ai langflow langfuse langgraph laya lemonade libertai litellm_agent
    litellm_proxy llamafile lm_studio manus maritalk meta meta_llama
    microsoft_365_copilot milvus minimax mistral modelscope mongodb moonshot morph nace
    nadir nano-gpt nebius neosantara nlp_cloud novita nscale nvidia_nim nvidia_riva oci
    ollama ollama_chat oobabooga openai openai_like opencode_go openinfer openrouter
    opensearch ovhcloud parallel_ai parasail perplexity petals pg_vector pinstripes poe
    predibase prism publicai qwen_ai_platform qwencloud ragflow recraft reducto
    refuseless reka replicate runwayml s3_vectors sagemaker sagemaker_chat
    sagemaker_nova sail sambanova sap scaledown scaleway scx-ai snowflake soniox
    stability strands_decider streamlake synthetic tencent tensormesh
    text-completion-codestral text-completion-inception text-completion-openai
    together_ai topaz transcribe triton typesafe v0 valkey vercel_ai_gateway vertex_ai
    vertex_ai_beta vllm volcengine voyage wally wandb watsonx watsonx_text xai
    xiaomi_mimo xinference zai zerogpu
    """.split()  # noqa: SIM905 (190 names, one line each otherwise)
)
"""Model-name prefixes that name a provider: LiteLLM's provider routes (its ``LlmProviders``
enum, litellm 1.110.2), matched exactly (lower case, as LiteLLM writes them)."""


def split_provider(model: str) -> tuple[str | None, str]:
    """``(provider, model)``: the prefix and the rest when ``model`` starts with
    ``<one of PROVIDER_PREFIXES>/`` followed by at least one character, else
    ``(None, model)``.

    >>> split_provider("openai/gpt-4o")
    ('openai', 'gpt-4o')
    >>> split_provider("meta-llama/Llama-3.1-8B-Instruct")
    (None, 'meta-llama/Llama-3.1-8B-Instruct')
    """
    head, sep, tail = model.partition("/")
    if sep and tail and head in PROVIDER_PREFIXES:
        return head, tail
    return None, model


__all__ = ["PROVIDER_PREFIXES", "split_provider"]
