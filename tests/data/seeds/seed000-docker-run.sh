docker run \
  --name [YOUR_MODEL_ID] \ <1>
  --gpus all \ <2>
  -v /root/.cache/huggingface:/root/.cache/huggingface \ <3>
  --env HUGGING_FACE_HUB_TOKEN=xxxx \ <4>
  --env VLLM_API_KEY=xxxx \ <5>
  -p 8000:8000 \ <6>
  --ipc=host \ <7>
  vllm/vllm-openai:v0.9.1 \ <8>
  --model mistralai/[YOUR_MODEL_ID] \ <9>
  --tool-call-parser mistral \ <10>
  --tokenizer-mode mistral \ <11>
  --config-format mistral \ <12>
  --load-format mistral \ <13>
  --enable-auto-tool-choice \ <14>
  --gpu-memory-utilization 0.90 \ <15>
  --tensor-parallel-size 2 <16>
