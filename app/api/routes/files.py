"""``GET /v1/files/{token}``: serve objects of the local-folder store through signed tokens."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter
from starlette.responses import FileResponse, Response, StreamingResponse

from app.api.deps import SettingsDep, StoreDep
from app.core.problems import Forbidden, NotFound, problem_responses
from app.core.security import InvalidToken, verify_download
from app.services.exports import close_stream, safe_filename
from app.storage.base import ObjectNotFound
from app.storage.local import LocalStore

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.get("/{token}", response_class=Response, responses={
    200: {"description": "The object, with Content-Type and Content-Disposition of the grant.",
          "content": {"application/octet-stream": {}}},
    **problem_responses(403, 404),
})
def download_file(token: str, settings: SettingsDep, store: StoreDep) -> Response:
    """The object a signed, unexpired token grants (no API key: the token is the credential)."""
    try:
        grant = verify_download(settings.signing_secret.get_secret_value(), token)
    except InvalidToken as exc:
        detail = ("the download link has expired; ask the API for a new one" if str(exc) == "expired"
                  else "the download link is invalid")
        raise Forbidden(detail, slug="invalid-download-token") from exc
    filename = safe_filename(grant.filename, default="download")
    if isinstance(store, LocalStore):
        try:
            path = store.path_of(grant.key)
        except ValueError as exc:
            raise Forbidden("the download link is invalid", slug="invalid-download-token") from exc
        if not path.is_file():
            raise NotFound("the file no longer exists")
        return FileResponse(path, media_type=grant.content_type, filename=filename,
                            headers={"Cache-Control": "private, max-age=60"})
    try:
        stream = store.open(grant.key)
    except ObjectNotFound as exc:
        raise NotFound("the file no longer exists") from exc

    def body() -> Iterator[bytes]:
        try:
            yield from iter(lambda: stream.read(1 << 20), b"")
        finally:
            close_stream(stream)

    return StreamingResponse(body(), media_type=grant.content_type,
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})
