"""How pollinate runs Flower on this machine: the processes it starts and stops, and the Flower App directory it hands them."""
