"""Transport security for a deployment: certificates and node keys (``pollinate certs``) and the Flower flags that use them."""
