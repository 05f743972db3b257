"""Prompts and responses (chat-formatted, of uneven length; some never ended) that the reward-source
tests and the reward-server tests score alike."""

PROMPTS = [
    "<|user|>\nWhat is the capital of the river country?\n<|assistant|>\n",
    "<|user|>\nHello\n<|assistant|>\n",
    "<|user|>\nTell me two things about the sea and the mountain, please.\n<|assistant|>\n",
    "<|user|>\nOne plus one?\n<|assistant|>\n",
    "<|user|>\nName a planet.\n<|assistant|>\n",
]
RESPONSES = [
    "The capital is near the river.",
    "Hello there, how can I help you today? I think it is a good day.",
    "yes",
    "Two.",
    "Maybe the earth, or some other planet far away from the sun and the sea",
]
ENDED = [True, True, False, True, False]
