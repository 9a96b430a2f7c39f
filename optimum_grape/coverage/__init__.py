"""Which MoE families of the installed transformers optimum-grape prunes: discovery from transformers'
own modeling files (`discover`), tiny models built from each family's own config class (`tiny`), the
same checks for every family (`matrix`), and the table and JSON they produce (`report`).

    python -m optimum_grape.coverage --doc docs/families.md
"""
