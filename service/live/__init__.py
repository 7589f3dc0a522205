"""Live transcription: audio in as it is spoken, words out while the speaker talks.

* ``features``: log-mel frames as samples arrive, equal to the offline features.
* ``buffered``: NeMo's buffered CTC streaming (``FrameBatchASR``) for offline-trained models.
* ``batcher``: one decode loop per model that runs the steps of many streams in one batch.
* ``session``: a live session: turn detection, the stream of one turn, events out; admission.
* ``realtime``: the OpenAI Realtime API (transcription sessions) over WebSocket.
* ``wyoming``: Home Assistant's Wyoming protocol over TCP.
"""
