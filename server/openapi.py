"""`/openapi.json`: an OpenAPI 3.1 description of every route (each also served under `/api`).

Written by hand, route by route; a test checks that it lists exactly the routes the application serves.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from server.file_names import WORKFLOW_NAME_PATTERN

OBJ = {"type": "object"}
STRING = {"type": "string"}
STRINGS = {"type": "array", "items": STRING}
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "object", "required": ["type", "message", "details", "extra_info"], "properties": {
        "type": STRING, "message": STRING, "details": STRING, "extra_info": OBJ}},
    "node_errors": {"type": "object", "description": "validation errors per node id"}}}
ERROR = {"description": "error: {error: {type, message, details, extra_info}}",
         "content": {"application/json": {"schema": ERROR_SCHEMA}}}


def _ok(description: str, schema: dict[str, Any] | None = None, media: str = "application/json") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema or OBJ}}}


def _query(name: str, description: str, type_: str = "string", **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": type_, **schema}}


def _path(name: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", **schema}}


def _body(description: str, schema: dict[str, Any] | None = None, required: bool = True) -> dict[str, Any]:
    return {"required": required, "description": description,
            "content": {"application/json": {"schema": schema or OBJ}}}


def _object(required: list[str] | None = None, **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required or [], "properties": properties}


def _nullable(type_: str, **schema: Any) -> dict[str, Any]:
    """An optional field: null means the same as leaving it out (as ComfyUI's clients assume)."""
    return {"type": [type_, "null"], **schema}


ERRORS = {"400": ERROR, "403": ERROR, "405": ERROR}
DONE = {"description": "done"}
PROMPT_BODY = _object(
    ["prompt"], prompt={"type": "object", "description": "API-format graph {node_id: {class_type, inputs}} or a "
                                                         "UI-format workflow"},
    client_id=_nullable("string"), prompt_id=_nullable("string", maxLength=200), extra_data=_nullable("object"),
    front=_nullable("boolean"), number=_nullable("number", minimum=-1e15, maximum=1e15),
    partial_execution_targets=_nullable("array", items={"type": ["string", "integer"]}))
PROMPT_REPLY = _object(["prompt_id", "number", "node_errors"], prompt_id=STRING, number={"type": "number"},
                       node_errors=OBJ, outputs=OBJ, status=OBJ)
QUEUE_ITEM = {"type": "array", "description": "[number, prompt_id, prompt, extra_data, outputs]",
              "minItems": 5, "maxItems": 5}
HISTORY_ENTRY = _object(["prompt", "outputs", "status"], prompt={"type": "array"}, outputs=OBJ, status=OBJ, meta=OBJ)
HISTORY = {"type": "object", "additionalProperties": HISTORY_ENTRY}
CHANGE_BODY = _object(clear=_nullable("boolean"), delete=_nullable("array", items=STRING))

# A file name: no control character, '/', '\\' or '..', at most 255 bytes of UTF-8 (a byte count JSON Schema
# cannot state: the pattern bounds characters). Python's `re` syntax, as the server's own checks.
FILE_NAME = {"type": "string", "pattern": r"^(?!.*\.\.)[^\x00-\x1f\x7f-\x9f/\\]{1,255}$",
             "description": "a file name: at most 255 bytes of UTF-8, no control characters, '/', '\\' or '..'"}
SUBFOLDER = {"type": "string", "pattern": r"^[^\x00-\x1f\x7f-\x9f]*$",
             "description": "a folder inside the chosen folder (one that leaves it is a 403)"}
WORKFLOW_NAME = {"type": "string", "pattern": f"^{WORKFLOW_NAME_PATTERN}$",
                 "description": "at most 128 characters, none of <>:\"|?*/\\ or '..', not starting with '.', '-' "
                                "or a space; '.json' is added when missing"}
UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "image": {"type": "string", "format": "binary"}, "type": {"enum": ["input", "temp", "output"]},
    "subfolder": SUBFOLDER, "overwrite": {"enum": ["true", "false", "1", "0"]},
    "original_ref": {"type": "string", "description": "/upload/mask only: JSON {filename, subfolder, type}"}}}}}}


def _error(description: str) -> dict[str, Any]:
    return {**ERROR, "description": f"error ({description}): {{error: {{type, message, details, extra_info}}}}"}


BAD_NAME = _error("invalid_filename: empty, a path, a control character, not UTF-8, or a name over 255 bytes; "
                  "invalid_form: a malformed multipart body; invalid_image")
QUOTA = _error("quota_exceeded: the input folder would pass --max-input-mb or --max-input-files; "
               "extra_info {limit, value}")
IMAGE_TOO_LARGE = _error("too_large: over --max-upload-mb; image_too_large: all frames together over "
                         "--max-image-pixels, or more frames than --max-image-frames")


# User files: a '/'-separated path in the user directory, no control character or '\\' (a path that leaves the
# directory is a 403; a name over 255 bytes of UTF-8 a 400, a byte count a schema cannot state).
USER_PATH = {"type": "string", "minLength": 1, "maxLength": 1024, "pattern": r"^[^\x00-\x1f\x7f-\x9f\\]*$",
             "description": "a path in the user directory, e.g. workflows/a.json (URL-encoded in a path)"}
ANY_JSON = {"type": ["object", "array", "string", "number", "boolean", "null"]}
SETTING_ID = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^[^\x00-\x1f\x7f-\x9f]*$"}
MODEL_NAME = {"type": "string", "minLength": 1, "pattern": r"^[^\x00-\x1f\x7f-\x9f]*$",
              "description": "a model's name in its folder (subfolders with '/')"}
BAD_USER_PATH = _error("invalid_filename: empty, a control character, '\\', over 1024 bytes or a name over 255 "
                       "bytes; not_a_folder")

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/prompt"): {
        "summary": "Queue a prompt (API or UI format). Body: prompt, client_id, prompt_id, extra_data (webhook), "
                   "front, number, partial_execution_targets.",
        "parameters": [_query("wait", "seconds to wait for the result (202 on timeout)", "number", minimum=0)],
        "requestBody": _body("{prompt, client_id?, prompt_id?, extra_data?, front?, number?, "
                             "partial_execution_targets?}; strings must be valid Unicode, numbers finite",
                             PROMPT_BODY),
        "responses": {"200": _ok("{prompt_id, number, node_errors} (+ outputs, status with ?wait)", PROMPT_REPLY),
                      "202": _ok("still running after ?wait: {prompt_id, number, node_errors}", PROMPT_REPLY),
                      **ERRORS}},
    ("GET", "/prompt"): {"summary": "Queue size", "responses": {
        "200": _ok("{exec_info: {queue_remaining}}", _object(
            ["exec_info"], exec_info=_object(["queue_remaining"], queue_remaining={"type": "integer"})))}},
    ("DELETE", "/prompt/{prompt_id}"): {
        "summary": "Cancel one pending or running prompt", "parameters": [_path("prompt_id")],
        "responses": {"200": _ok("{prompt_id, cancelled: pending|running}",
                                 _object(["prompt_id", "cancelled"], prompt_id=STRING,
                                         cancelled={"enum": ["pending", "running"]})),
                      "404": ERROR, **ERRORS}},
    ("GET", "/queue"): {"summary": "Running and pending prompts",
                        "responses": {"200": _ok("{queue_running: [item], queue_pending: [item]}",
                                                 _object(["queue_running", "queue_pending"],
                                                         queue_running={"type": "array", "items": QUEUE_ITEM},
                                                         queue_pending={"type": "array", "items": QUEUE_ITEM}))}},
    ("POST", "/queue"): {"summary": "Clear the queue and/or delete pending prompts",
                         "requestBody": _body("{clear?: bool, delete?: [prompt_id]}", CHANGE_BODY),
                         "responses": {"200": DONE, **ERRORS}},
    ("GET", "/history"): {"summary": "History entries, oldest first",
                          "parameters": [_query("max_items", "at most this many (the newest without offset)",
                                                "integer", minimum=0),
                                         _query("offset", "skip this many of the oldest (negative: none)", "integer")],
                          "responses": {"200": _ok("{prompt_id: entry}", HISTORY), **ERRORS}},
    ("GET", "/history/{prompt_id}"): {"summary": "One history entry ({} while queued or unknown)",
                                      "parameters": [_path("prompt_id")],
                                      "responses": {"200": _ok("{prompt_id: entry}", HISTORY), **ERRORS}},
    ("POST", "/history"): {"summary": "Clear history and/or delete entries (and their temp files)",
                           "requestBody": _body("{clear?: bool, delete?: [prompt_id]}", CHANGE_BODY),
                           "responses": {"200": DONE, **ERRORS}},
    ("POST", "/interrupt"): {"summary": "Interrupt the running prompt(s), or only prompt_id if it is running",
                             "requestBody": _body("{prompt_id?} or nothing", _object(prompt_id=_nullable("string")),
                                                  False),
                             "responses": {"200": DONE, **ERRORS}},
    ("POST", "/free"): {"summary": "Unload models / free cached outputs after the current prompt",
                        "requestBody": _body("{unload_models?: bool, free_memory?: bool}",
                                             _object(unload_models=_nullable("boolean"),
                                                     free_memory=_nullable("boolean"))),
                        "responses": {"200": DONE, **ERRORS}},
    ("GET", "/view"): {
        "summary": "A file from input/output/temp: png, jpeg, webp, gif, bmp, tiff, mp4, webm and json with their "
                   "type, inline; any other as application/octet-stream, attachment (RFC 6266 filename and filename*)",
        "parameters": [{**_query("filename", "file name (may end with ' [output]' etc.)"), "required": True,
                        "schema": FILE_NAME},
                       {**_query("type", "input, output (default) or temp"),
                        "schema": {"enum": ["input", "output", "temp"]}},
                       {**_query("subfolder", "subfolder"), "schema": SUBFOLDER},
                       _query("preview", "re-encode: 'webp;90', 'jpeg;90', 'png' (another format: webp)"),
                       {**_query("channel", "rgba (default), rgb or a"), "schema": {"enum": ["rgba", "rgb", "a"]}},
                       _query("token", "auth token, for <img> tags")],
        "responses": {"200": _ok("the file", {"type": "string", "format": "binary"}, "application/octet-stream"),
                      "400": BAD_NAME, "403": ERROR, "404": ERROR, "413": IMAGE_TOO_LARGE}},
    ("GET", "/internal/files/{directory_type}"): {
        "summary": "The images of input/, output/ or temp/ as LoadImage and LoadImageOutput offer them, newest "
                   "first (the refresh button of ComfyUI's front end asks it)",
        "parameters": [{**_path("directory_type"), "schema": {"enum": ["input", "output", "temp"]}}],
        "responses": {"200": _ok("[name]", STRINGS), **ERRORS}},
    ("POST", "/upload/image"): {"summary": "Upload an image, or a video for LoadVideo (as ComfyUI's front end does)",
                                "requestBody": UPLOAD_BODY,
                                "responses": {"200": _ok("{name, subfolder, type}"), "400": BAD_NAME, "403": ERROR,
                                              "413": IMAGE_TOO_LARGE, "507": QUOTA,
                                              "501": _error("video_unavailable: a video, and PyAV is not "
                                                            "installed")}},
    ("POST", "/upload/mask"): {"summary": "Upload a mask: its alpha replaces the original image's alpha",
                               "requestBody": UPLOAD_BODY,
                               "responses": {"200": _ok("{name, subfolder, type}"), "400": BAD_NAME, "403": ERROR,
                                             "404": ERROR, "413": IMAGE_TOO_LARGE, "507": QUOTA}},
    ("GET", "/workflows"): {"summary": "Saved workflow names", "responses": {"200": _ok("[name]", {"type": "array"})}},
    ("GET", "/workflows/{name}"): {"summary": "A saved workflow", "parameters": [_path("name", **WORKFLOW_NAME)],
                                   "responses": {"200": _ok("the workflow JSON"), "400": ERROR, "404": ERROR}},
    ("PUT", "/workflows/{name}"): {"summary": "Save a workflow", "parameters": [_path("name", **WORKFLOW_NAME)],
                                   "requestBody": _body("the workflow JSON (UI or API format), at most "
                                                        "--max-workflow-mb"),
                                   "responses": {"200": _ok("{name}"), "400": ERROR,
                                                 "413": _error("too_large: over --max-workflow-mb"),
                                                 "507": _error("quota_exceeded: a new name past --max-workflows; "
                                                               "extra_info {limit, value}")}},
    ("DELETE", "/workflows/{name}"): {"summary": "Delete a saved workflow",
                                      "parameters": [_path("name", **WORKFLOW_NAME)],
                                      "responses": {"200": _ok("{deleted}"), "400": ERROR, "404": ERROR}},
    ("GET", "/object_info"): {"summary": "Every node type's declaration",
                              "responses": {"200": _ok("{class: node_info}")}},
    ("GET", "/object_info/{node_class}"): {"summary": "One node type's declaration ({} if unknown)",
                                           "parameters": [_path("node_class")],
                                           "responses": {"200": _ok("{class: node_info}")}},
    ("GET", "/system_stats"): {"summary": "System and device information",
                               "responses": {"200": _ok("{system, devices}", _object(
                                   ["system", "devices"], system=OBJ, devices={"type": "array"}))}},
    ("GET", "/embeddings"): {"summary": "Embedding names", "responses": {"200": _ok("[name]", STRINGS)}},
    ("GET", "/models"): {"summary": "Model folder names", "responses": {"200": _ok("[folder]", STRINGS)}},
    ("GET", "/models/{folder}"): {"summary": "Model files in a folder", "parameters": [_path("folder")],
                                  "responses": {"200": _ok("[file]", STRINGS), "404": ERROR}},
    ("GET", "/features"): {"summary": "Server feature flags",
                           "responses": {"200": _ok("{supports_preview_metadata, max_upload_size}", _object(
                               ["supports_preview_metadata", "max_upload_size"],
                               supports_preview_metadata={"type": "boolean"}, max_upload_size={"type": "integer"}))}},
    # ComfyUI's front end: user data and settings (server/routes_user.py), model library, logs, templates
    # (server/routes_frontend.py).
    ("GET", "/users"): {"summary": "User storage: one user, 'default', on the server (as ComfyUI without "
                                   "--multi-user); migrated once the user directory exists",
                        "responses": {"200": _ok("{storage: 'server', migrated}", _object(
                            ["storage", "migrated"], storage={"enum": ["server"]}, migrated={"type": "boolean"}))}},
    ("POST", "/users"): {"summary": "Create a user: refused (403 single_user), this server has one user",
                         "requestBody": _body("{username}", _object(["username"], username=STRING)),
                         "responses": {"400": ERROR, "403": _error("single_user"), "405": ERROR}},
    ("GET", "/userdata"): {
        "summary": "The files of a folder of the user directory, relative to it (hidden names left out)",
        "parameters": [{**_query("dir", "the folder, e.g. workflows"), "required": True, "schema": USER_PATH},
                       _query("recurse", "'true': subfolders too"), _query("full_info", "'true': {path, size, "
                                                                                      "modified, created} each"),
                       _query("split", "'true': [path, ...its parts] each (without full_info)")],
        "responses": {"200": _ok("[path] | [[path, ...parts]] | [{path, size, modified, created}]",
                                 {"type": "array"}),
                      "400": BAD_USER_PATH, "403": ERROR, "404": ERROR, "405": ERROR}},
    ("GET", "/v2/userdata"): {
        "summary": "One folder of the user directory: its files and folders with their paths from the directory",
        "parameters": [{**_query("path", "the folder ('' or absent: the user directory)"),
                        "schema": {**USER_PATH, "minLength": 0}}],
        "responses": {"200": _ok("[{name, path, type: file|directory, size?, modified?}]", {
                          "type": "array", "items": _object(["name", "path", "type"], name=STRING, path=STRING,
                                                            type={"enum": ["file", "directory"]})}),
                      "400": BAD_USER_PATH, "403": ERROR, "404": ERROR, "405": ERROR}},
    ("GET", "/userdata/{file}"): {
        "summary": "A user file (URL-encoded path): JSON and images inline, anything else as a download",
        "parameters": [{**_path("file"), "schema": USER_PATH}],
        "responses": {"200": {"description": "the file", "content": {"*/*": {"schema": {}}}},
                      "400": BAD_USER_PATH, "403": ERROR, "404": ERROR, "405": ERROR}},
    ("POST", "/userdata/{file}"): {
        "summary": "Store a user file atomically (the body as is, at most --max-workflow-mb)",
        "parameters": [{**_path("file"), "schema": USER_PATH},
                       _query("overwrite", "'false': 409 if the file exists (default: replace it)"),
                       _query("full_info", "'true': answer the file's info instead of its path")],
        "requestBody": {"required": False, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": _ok("its path in the user directory, or {path, size, modified, created}",
                                 {"type": ["string", "object"]}),
                      "400": BAD_USER_PATH, "403": ERROR, "405": ERROR,
                      "409": _error("file_exists: overwrite=false and the file exists; not_a_file"),
                      "413": _error("too_large: over --max-workflow-mb"),
                      "507": _error("quota_exceeded: a new file past --max-workflows files")}},
    ("DELETE", "/userdata/{file}"): {
        "summary": "Delete a user file", "parameters": [{**_path("file"), "schema": USER_PATH}],
        "responses": {"204": DONE, "400": BAD_USER_PATH, "403": ERROR, "404": ERROR, "405": ERROR}},
    ("POST", "/userdata/{file}/move/{dest}"): {
        "summary": "Move (rename) a user file",
        "parameters": [{**_path("file"), "schema": USER_PATH}, {**_path("dest"), "schema": USER_PATH},
                       _query("overwrite", "'false': 409 if dest exists (default: replace it)"),
                       _query("full_info", "'true': answer dest's info instead of its path")],
        "responses": {"200": _ok("dest's path in the user directory, or {path, size, modified, created}",
                                 {"type": ["string", "object"]}),
                      "400": BAD_USER_PATH, "403": ERROR, "404": ERROR, "405": ERROR,
                      "409": _error("file_exists: overwrite=false and dest exists; not_a_file"),
                      "507": _error("quota_exceeded")}},
    ("GET", "/settings"): {"summary": "Every setting of the user (comfy.settings.json)",
                           "responses": {"200": _ok("{id: value}"), "500": _error("invalid_settings_file")}},
    ("POST", "/settings"): {"summary": "Merge settings (ids given replace theirs, others are kept)",
                            "requestBody": _body("{id: value}"),
                            "responses": {"200": DONE, "400": ERROR, "405": ERROR,
                                          "413": _error("too_large: over --max-workflow-mb"),
                                          "500": _error("invalid_settings_file")}},
    ("GET", "/settings/{id}"): {"summary": "One setting's value (null when unset)",
                                "parameters": [{**_path("id"), "schema": SETTING_ID}],
                                "responses": {"200": _ok("the value (any JSON)", ANY_JSON), "400": ERROR,
                                              "405": ERROR,
                                              "500": _error("invalid_settings_file")}},
    ("POST", "/settings/{id}"): {"summary": "Store one setting (the body is its JSON value)",
                                 "parameters": [{**_path("id"), "schema": SETTING_ID}],
                                 "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
                                 "responses": {"200": DONE, "400": ERROR, "405": ERROR,
                                               "413": _error("too_large: over --max-workflow-mb"),
                                               "500": _error("invalid_settings_file")}},
    ("GET", "/i18n"): {"summary": "Node packs' translations by locale (none)", "responses": {"200": _ok("{}")}},
    ("GET", "/extensions"): {"summary": "Front-end extension scripts of node packs (their WEB_DIRECTORY's .js files)",
                             "responses": {"200": _ok("[url]", STRINGS)}},
    ("GET", "/extensions/{pack}/{path}"): {
        "summary": "A file of a node pack's web folder (public, like the canvas' own scripts)",
        "parameters": [_path("pack"), _path("path")],
        "responses": {"200": {"description": "the file"}, "404": {"description": "no such pack or file"}}},
    ("GET", "/workflow_templates"): {"summary": "Node packs' example workflows by pack (none)",
                                     "responses": {"200": _ok("{pack: [name]}")}},
    ("GET", "/experiment/models"): {
        "summary": "Model folders and where each is looked for (public names)",
        "responses": {"200": _ok("[{name, folders}]", {"type": "array", "items": _object(
            ["name", "folders"], name=STRING, folders=STRINGS)})}},
    ("GET", "/experiment/models/{folder}"): {
        "summary": "The files of a model folder, each with the index of the folder it is in",
        "parameters": [_path("folder")],
        "responses": {"200": _ok("[{name, pathIndex}]", {"type": "array", "items": _object(
            ["name", "pathIndex"], name=STRING, pathIndex={"type": "integer"})}), "404": ERROR, "405": ERROR}},
    ("GET", "/experiment/models/preview/{folder}/{path_index}/{filename}"): {
        "summary": "A model's preview (an image beside it, or a cover image in its metadata) as WebP",
        "parameters": [_path("folder"), {**_path("path_index"), "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                       {**_path("filename"), "schema": MODEL_NAME}],
        "responses": {"200": _ok("the image", {"type": "string", "format": "binary"}, "image/webp"),
                      "400": ERROR, "403": ERROR, "404": ERROR, "405": ERROR,
                      "413": _error("image_too_large")}},
    ("GET", "/view_metadata/{folder}"): {
        "summary": "The __metadata__ of a .safetensors model file",
        "parameters": [_path("folder"), {**_query("filename", "the model's name in the folder"), "required": True,
                                         "schema": MODEL_NAME}],
        "responses": {"200": _ok("{key: text}"), "400": ERROR, "403": ERROR, "404": ERROR, "405": ERROR}},
    ("GET", "/internal/logs"): {"summary": "The recent server log as one text",
                                "responses": {"200": _ok("text", STRING)}},
    ("GET", "/internal/logs/raw"): {
        "summary": "The recent server log lines",
        "responses": {"200": _ok("{entries: [{t, m}], size: {cols, rows}}", _object(
            ["entries", "size"], entries={"type": "array", "items": _object(["t", "m"], t=STRING, m=STRING)},
            size=_object(["cols", "rows"], cols={"type": "integer"}, rows={"type": "integer"})))}},
    ("PATCH", "/internal/logs/subscribe"): {
        "summary": "Send (enabled) or stop sending new log lines to a WebSocket client as `logs` events",
        "requestBody": _body("{clientId, enabled}", _object(
            ["clientId", "enabled"], clientId={"type": "string", "minLength": 1, "maxLength": 200},
            enabled={"type": "boolean"})),
        "responses": {"200": DONE, "400": ERROR, "405": ERROR, "413": _error("too_large: over --max-workflow-mb")}},
    ("GET", "/internal/folder_paths"): {"summary": "Where each kind of model is looked for (public names)",
                                        "responses": {"200": _ok("{folder: [path]}")}},
    ("GET", "/templates/{file}"): {
        "summary": "The shipped workflows as templates: index.json (and index.<locale>.json), index_logo.json, "
                   "<name>.json, the drawn thumbnail <name>-1.webp",
        "parameters": [_path("file")],
        "responses": {"200": {"description": "the index, a workflow or a thumbnail", "content": {
            "application/json": {"schema": {}}, "image/webp": {"schema": {"type": "string", "format": "binary"}}}},
            "404": ERROR, "405": ERROR}},
    ("GET", "/global_subgraphs"): {
        "summary": "Subgraph blueprints node packs ship (custom_nodes/<pack>/subgraphs/*.json), without their data",
        "responses": {"200": _ok("{id: {source, name, info: {node_pack}}}")}},
    ("GET", "/global_subgraphs/{id}"): {
        "summary": "One subgraph blueprint, with `data`: its workflow JSON as text",
        "parameters": [_path("id")],
        "responses": {"200": _ok("{source, name, info: {node_pack}, data}"), "404": ERROR, "405": ERROR,
                      "413": ERROR, "422": ERROR}},
    ("GET", "/openapi.json"): {"summary": "This document", "responses": {"200": _ok("OpenAPI 3.1")}},
    ("GET", "/ws"): {"summary": "WebSocket of events ({type, data} text frames, binary previews)",
                     "parameters": [_query("clientId", "resume this client's stream"),
                                    _query("token", "auth token")],
                     "responses": {"101": {"description": "switching protocols"},
                                   "400": ERROR}},
}


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), operation in OPERATIONS.items():
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Latent Loom", "version": "0.1.0",
                 "description": "ComfyUI-compatible API. Every path is also served under /api."},
        "servers": [{"url": "/"}, {"url": "/api"}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
        "paths": paths,
    }


async def handle(request: web.Request) -> web.Response:
    return web.json_response(document())
