"""dhub-wordcount: an example of steps written and installed outside dhub-batches.

    plugin.py  the declarations (entry points `dhub.steps`): config model, doc, code paths
    steps.py   the steps: generate text per partition, count words, merge the counts
    text.py    the generated text and the batch's file layout
"""
