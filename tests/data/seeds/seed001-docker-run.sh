docker run --name Mistral-Small-3.2-24B --gpus all \
-v /root/.cache/huggingface:/root/.cache/huggingface \
--env HUGGING_FACE_HUB_TOKEN=xxxx \
--env VLLM_API_KEY=xxxx \
-p 8000:8000 \
--ipc=host \
vllm/vllm-openai:v0.9.1 \
--model mistralai/Mistral-Small-3.2-24B-Instruct-2506 \
--tool-call-parser mistral \
--tokenizer-mode mistral \
--config-format mistral \
--load-format mistral \
--enable-auto-tool-choice \
--gpu-memory-utilization 0.90 \
--tensor-parallel-size 2
