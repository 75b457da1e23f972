print("rapace-bench: building")
