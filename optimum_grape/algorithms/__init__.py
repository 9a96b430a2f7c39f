"""Pure tensor functions: similarity, budgets, GRAPE allocation, clustering and merging."""
