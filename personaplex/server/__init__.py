"""The real-time server: HTTP/WebSocket front end over the conversation hub (``personaplex.serving``)."""
