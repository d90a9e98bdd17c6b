"""The one vocabulary of every bundled sample set (NLI, confidence tokens, step data) and of the tiny tokenizer:
people, activities, and places with whether they are indoors or outdoors (the fact the sample labels follow)."""

NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lucia"]
ACTIVITIES = ["reading", "cooking", "sleeping", "singing", "painting", "talking", "waiting", "writing"]
PLACES = {
    "kitchen": "indoors", "library": "indoors", "office": "indoors", "bedroom": "indoors",
    "museum": "indoors", "garage": "indoors", "park": "outdoors", "garden": "outdoors",
    "forest": "outdoors", "beach": "outdoors", "street": "outdoors", "field": "outdoors",
}
