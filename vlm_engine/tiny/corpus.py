"""A fixed English text used to train the tiny checkpoints' tokenizers.

It is written for this project so that every machine trains byte-identical tokenizers.
"""

PARAGRAPHS = [
    "A photo of a red bicycle leaning against a white wall next to a green door.",
    "Two dogs are playing on the grass in a park while a child throws a ball.",
    "What is in this image? Describe the picture in detail. How many people are there?",
    "The kitchen has a wooden table, four chairs, a bowl of fruit and a window.",
    "A small boat sails across a calm blue lake under a bright morning sky.",
    "The cat sleeps on a soft blue blanket beside a stack of old books.",
    "A busy street at night with cars, buses, lights, shops and people walking.",
    "Snow covers the mountains; a skier in a yellow jacket moves down the slope.",
    "An image of a snowman warming himself by a fire in the forest.",
    "The chart shows sales rising from January to June, then falling in July.",
    "A plate with rice, chicken, carrots and a glass of water on a table.",
    "The man in the black hat reads a newspaper on a bench near the station.",
    "Question: what color is the car? Answer: the car is blue and parked outside.",
    "There is a sign with the words open every day from nine to five.",
    "A bird with orange feathers sits on the branch of a tall tree.",
    "The woman holds an umbrella while it rains over the city square.",
    "Three apples, two bananas and one orange are placed in a basket.",
    "The screenshot shows a web page with a search box and a list of results.",
    "A train crosses a stone bridge over a river surrounded by hills.",
    "Describe this image. The image shows a room with a bed, a lamp and a clock.",
    "User: hello, can you see the picture? Assistant: yes, I can see a garden.",
    "Left, right, top, bottom, center, near, far, above, below, inside, outside.",
    "Numbers: one two three four five six seven eight nine ten eleven twelve.",
    "Colors: red orange yellow green blue purple pink brown black white gray.",
]


def corpus(repeats: int = 20) -> list[str]:
    """Return the training lines, repeated so that frequent pairs are learned."""
    return PARAGRAPHS * repeats
