"""How the shapes world words its texts: the question templates of every kind and the answer-format
instructions, for the seen splits and, held out, for the shifted split. Data only; `questions.py`
fills them in from a scene graph.
"""

from __future__ import annotations

# The wording of every question kind. The keys: color, shape, size ({a}: the object), count ({p}: a
# plural such as "red stars"), count_all (every object), exists ({n}: "a red star", {p}, {a}: "red
# star"), left/right/above/below (yes/no: is {a} <relation> {b}?), horizontal/vertical (answers
# left/right or above/below), caption, detailed. The kinds `relations.py` asks: nearer (which of {a}
# and {b} is nearer to {c}), largest/smallest (the one object of that size), larger/smaller (which of
# {a} and {b}). The follow-up turns of `multiturn.py`: refer_back ({attr} of "it", the object the
# previous turn asked about), neighbour ({attr} of the object just to its {side}), what_else,
# unanswerable ({a}: an object of the image, or no field). TEMPLATES word every split but the shifted
# one; SHIFTED_TEMPLATES word the shifted split only (held out: no seen split ever uses them).
TEMPLATES = {
    "color": (
        "What color is the {a}?",
        "What colour is the {a}?",
        "What is the color of the {a}?",
        "What is the colour of the {a}?",
        "Which color does the {a} have?",
        "Tell me the color of the {a}.",
        "What color is the {a} in the image?",
        "Name the colour of the {a}.",
        "The {a} is what color?",
    ),
    "shape": (
        "What shape is the {a}?",
        "What is the shape of the {a}?",
        "Which shape is the {a}?",
        "Name the shape of the {a}.",
        "What kind of shape is the {a}?",
        "What shape does the {a} have?",
        "Tell me the shape of the {a}.",
        "The {a} has what shape?",
    ),
    "size": (
        "What size is the {a}?",
        "Is the {a} small or large?",
        "How big is the {a}?",
        "Is the {a} large or small?",
        "What is the size of the {a}?",
        "Tell me the size of the {a}.",
        "Is the {a} a small one or a large one?",
        "Which size is the {a}, small or large?",
    ),
    "count": (
        "How many {p} are there?",
        "How many {p} are in the image?",
        "Count the {p}.",
        "What is the number of {p} in the picture?",
        "How many {p} can you see?",
        "How many {p} does the image contain?",
        "How many {p} are shown?",
        "Count the {p} in the image.",
        "What is the count of {p}?",
    ),
    "count_all": (
        "How many objects are there?",
        "How many objects are in the image?",
        "How many shapes are there in total?",
        "What is the total number of objects?",
        "Count all the objects in the picture.",
        "How many items can you see?",
        "How many things are in the picture altogether?",
        "How many objects does the image contain?",
        "What is the number of shapes in the image?",
        "Count the shapes.",
        "How many objects are there in total?",
    ),
    "exists": (
        "Is there {n} in the picture?",
        "Can you see {n}?",
        "Does the image contain {n}?",
        "Is there {n} anywhere in the image?",
        "Are there any {p}?",
        "Are there any {p} in the image?",
        "Do you see {n}?",
        "Is there {n}?",
        "Does the picture show {n}?",
    ),
    "left": (
        "Is the {a} to the left of the {b}?",
        "Is the {a} left of the {b}?",
        "Is the {a} on the left side of the {b}?",
        "Is the {a} on the left of the {b}?",
        "Is the {a} further left than the {b}?",
        "Is the {a} positioned to the left of the {b}?",
        "Is the {a} placed to the left of the {b}?",
        "Is the {a} farther to the left than the {b}?",
    ),
    "right": (
        "Is the {a} to the right of the {b}?",
        "Is the {a} right of the {b}?",
        "Is the {a} on the right side of the {b}?",
        "Is the {a} on the right of the {b}?",
        "Is the {a} further right than the {b}?",
        "Is the {a} positioned to the right of the {b}?",
        "Is the {a} placed to the right of the {b}?",
        "Is the {a} farther to the right than the {b}?",
    ),
    "above": (
        "Is the {a} above the {b}?",
        "Is the {a} higher up than the {b}?",
        "Is the {a} over the {b}?",
        "Is the {a} higher than the {b}?",
        "Is the {a} positioned above the {b}?",
        "Is the {a} further up than the {b}?",
        "Is the {a} placed above the {b}?",
        "Is the {a} farther up than the {b}?",
    ),
    "below": (
        "Is the {a} below the {b}?",
        "Is the {a} lower down than the {b}?",
        "Is the {a} under the {b}?",
        "Is the {a} lower than the {b}?",
        "Is the {a} beneath the {b}?",
        "Is the {a} further down than the {b}?",
        "Is the {a} placed below the {b}?",
        "Is the {a} farther down than the {b}?",
    ),
    "horizontal": (
        "Which side of the {b} is the {a} on?",
        "Is the {a} left or right of the {b}?",
        "Is the {a} to the right or to the left of the {b}?",
        "Is the {a} to the left or to the right of the {b}?",
        "Is the {a} on the left or the right side of the {b}?",
        "Relative to the {b}, is the {a} left or right?",
        "Is the {a} placed left or right of the {b}?",
        "Compared with the {b}, is the {a} on the left or the right?",
    ),
    "vertical": (
        "Is the {a} above or below the {b}?",
        "Is the {a} below or above the {b}?",
        "Relative to the {b}, is the {a} above or below?",
        "Is the {a} positioned above or below the {b}?",
        "Compared with the {b}, is the {a} above or below it?",
        "Is the {a} situated above or below the {b}?",
        "Is the {a} above the {b} or below the {b}?",
    ),
    "caption": (
        "Describe the image briefly.",
        "Write a short caption for this image.",
        "What is in this picture? Answer briefly.",
        "Give a one-line caption of the image.",
        "Caption this picture in one sentence.",
    ),
    "detailed": (
        "Describe the image in detail.",
        "Give a detailed description of this picture.",
        "Describe every object in the image and where it is.",
        "What do you see? Describe the objects, their positions and relations.",
        "Describe this picture thoroughly.",
    ),
    "nearer": (
        "Which is nearer to the {c}, the {a} or the {b}?",
        "Which is closer to the {c}: the {a} or the {b}?",
        "Is the {a} or the {b} nearer to the {c}?",
        "Which of the {a} and the {b} is closer to the {c}?",
        "What is nearer to the {c}, the {a} or the {b}?",
        "Which one is closer to the {c}, the {a} or the {b}?",
    ),
    "largest": (
        "Which object is the largest?",
        "Which is the biggest object?",
        "What is the largest object in the image?",
        "Which shape is the biggest?",
        "Name the largest object.",
    ),
    "smallest": (
        "Which object is the smallest?",
        "Which is the smallest object?",
        "What is the smallest object in the image?",
        "Which shape is the tiniest?",
        "Name the smallest object.",
    ),
    "larger": (
        "Which is larger, the {a} or the {b}?",
        "Which is bigger: the {a} or the {b}?",
        "Is the {a} or the {b} larger?",
        "Which of the {a} and the {b} is bigger?",
        "What is larger, the {a} or the {b}?",
    ),
    "smaller": (
        "Which is smaller, the {a} or the {b}?",
        "Which is smaller: the {a} or the {b}?",
        "Is the {a} or the {b} smaller?",
        "Which of the {a} and the {b} is smaller?",
        "What is smaller, the {a} or the {b}?",
    ),
    "refer_back": (
        "And what {attr} is it?",
        "What {attr} is it?",
        "And its {attr}?",
        "What is its {attr}?",
        "Tell me its {attr} too.",
        "What about its {attr}?",
    ),
    "neighbour": (
        "And what {attr} is the object just to its {side}?",
        "What {attr} is the object right next to it on the {side}?",
        "And the one just {side} of it: what {attr} is it?",
        "What is the {attr} of the object just to the {side} of it?",
        "And the next object to its {side}, what {attr} is that?",
    ),
    "what_else": (
        "What else is there?",
        "What else do you see?",
        "What other objects are there?",
        "Anything else in the picture?",
        "What else is in the image?",
    ),
    "unanswerable": (
        "What is the {a}'s name?",
        "What time is it in the picture?",
        "Who drew this picture?",
        "What is the {a} made of?",
        "How much does the {a} weigh?",
        "What is the weather like in the picture?",
        "Why is the {a} there?",
    ),
}
SHIFTED_TEMPLATES = {
    "color": (
        "Which colour is the {a} painted in?",
        "What's the colour of the {a}?",
        "Can you tell me what color the {a} is?",
        "Identify the color of the {a}.",
    ),
    "shape": (
        "What's the shape of the {a}?",
        "Which form does the {a} have?",
        "Identify the shape of the {a}.",
        "Can you tell me what shape the {a} is?",
    ),
    "size": (
        "What's the size of the {a}?",
        "How large is the {a}?",
        "Would you say the {a} is small or large?",
        "Is the {a} drawn large or small?",
    ),
    "count": (
        "How many {p} appear in this picture?",
        "Tell me the number of {p}.",
        "What number of {p} can be seen?",
        "Please count the {p} in the picture.",
    ),
    "count_all": (
        "In total, how many objects are shown?",
        "How many figures are drawn in this image?",
        "Count every shape you can see.",
        "What's the total count of items in the image?",
        "Tell me how many objects the picture contains.",
    ),
    "exists": (
        "Is {n} visible in this picture?",
        "Does this image include any {p}?",
        "Can {n} be found in the picture?",
        "Is there at least one {a} in the image?",
    ),
    "left": (
        "Does the {a} lie to the left of the {b}?",
        "Is the {a} more to the left than the {b}?",
        "Is the {a} located left of the {b}?",
    ),
    "right": (
        "Does the {a} lie to the right of the {b}?",
        "Is the {a} more to the right than the {b}?",
        "Is the {a} located right of the {b}?",
    ),
    "above": (
        "Does the {a} lie above the {b}?",
        "Is the {a} located higher in the image than the {b}?",
        "Is the {a} nearer the top than the {b}?",
    ),
    "below": (
        "Does the {a} lie below the {b}?",
        "Is the {a} located underneath the {b}?",
        "Is the {a} nearer the bottom than the {b}?",
    ),
    "horizontal": (
        "On which side of the {b} does the {a} lie, left or right?",
        "Is the {a} located left or right of the {b}?",
        "Seen from the {b}, is the {a} on the left or on the right?",
    ),
    "vertical": (
        "Does the {a} lie above or below the {b}?",
        "Is the {a} located above the {b} or below it?",
        "Seen from the {b}, is the {a} above or below?",
    ),
    "caption": (
        "Summarise the picture in a few words.",
        "What does this image show? Keep it short.",
    ),
    "detailed": (
        "Walk me through everything in this image.",
        "Explain in detail what the picture contains and where.",
    ),
    "nearer": (
        "Which lies closer to the {c}: the {a} or the {b}?",
        "Seen from the {c}, is the {a} or the {b} nearer?",
    ),
    "largest": (
        "Which object is drawn the largest?",
        "Which one of the objects is the biggest?",
    ),
    "smallest": (
        "Which object is drawn the smallest?",
        "Which one of the objects is the tiniest?",
    ),
    "larger": (
        "Which one is drawn larger, the {a} or the {b}?",
        "Between the {a} and the {b}, which is bigger?",
    ),
    "smaller": (
        "Which one is drawn smaller, the {a} or the {b}?",
        "Between the {a} and the {b}, which is smaller?",
    ),
    "refer_back": (
        "Which {attr} does it have, then?",
        "Could you also tell me its {attr}?",
    ),
    "neighbour": (
        "Which {attr} has its nearest neighbour on the {side}?",
        "Could you tell me the {attr} of the object immediately to its {side}?",
    ),
    "what_else": (
        "Is there anything besides that?",
        "Which other objects can be seen?",
    ),
    "unanswerable": (
        "Who owns the {a}?",
        "In which city was this picture taken?",
        "What does the {a} smell like?",
    ),
}
# The answer-format instruction after a single-turn VQA question: one of these, or none at all for a
# NO_INSTRUCTION fraction of the records (answers are short either way). SHIFTED_INSTRUCTIONS are held
# out for the shifted split like SHIFTED_TEMPLATES.
INSTRUCTIONS = (
    "Answer the question using a single word or number.",
    "Answer with a single word or number.",
    "Reply with one word or a number.",
    "Use a single word or number to answer.",
    "Give a short answer: one word or a number.",
    "Answer in one word or number.",
)
SHIFTED_INSTRUCTIONS = (
    "Respond using just one word or a number.",
    "Keep your answer to a single word or number.",
)
NO_INSTRUCTION = 0.25
# The instruction after a single-turn question answered with an object's colour and shape ("red star":
# nearer, largest, smallest, larger, smaller), in place of INSTRUCTIONS; held out as above.
NAME_INSTRUCTIONS = (
    "Answer with the colour and shape of the object.",
    "Name the object by its color and shape.",
    "Answer with a colour and a shape.",
    "Reply with the object's color and shape only.",
)
SHIFTED_NAME_INSTRUCTIONS = ("Respond with just the colour and the shape.",)
# The whole answer to a question the image cannot answer (multiturn.py's unanswerable turns).
CANNOT_TELL = "I can't tell that from the image."
# The answer to "What else is there?" when the conversation has named every object already.
NOTHING_ELSE = "There is nothing else."
