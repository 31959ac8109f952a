// Typed errors of the image subsystem. Every message says what was asked, what
// failed and what to do; `code` lets callers (CLI, CRI) branch without parsing text.

export type ImageErrorCode =
  | 'BAD_REFERENCE'        // the image reference does not parse
  | 'BAD_PLATFORM'         // --platform does not parse
  | 'NOT_FOUND'            // registry 404, or no such image in the local store
  | 'UNAUTHORIZED'         // registry 401/403 after trying the credentials we have
  | 'REGISTRY'             // any other registry/protocol failure (5xx after retries, bad JSON)
  | 'TIMEOUT'              // a registry (or token server) stopped answering
  | 'DIGEST_MISMATCH'      // content does not hash to the digest that named it
  | 'SIZE_MISMATCH'        // content longer or shorter than its descriptor says
  | 'MANIFEST_TOO_LARGE'   // manifests are capped at 4 MiB
  | 'UNSUPPORTED_MEDIA_TYPE'
  | 'PLATFORM_NOT_FOUND'   // an index without the wanted platform
  | 'BAD_MANIFEST'         // structurally invalid manifest / index
  | 'BAD_CONFIG'           // image config invalid or inconsistent with its manifest
  | 'DIFF_ID_MISMATCH'     // converter's diff-id differs from config rootfs.diff_ids
  | 'LAYER_CONVERSION'     // the layer -> squashfs converter refused the layer
  | 'BAD_ARCHIVE'          // `vmlet load` input is not an OCI layout / docker-archive
  | 'LOCK_TIMEOUT'         // another vmlet process held a store lock for too long
  | 'UNIMPLEMENTED';

export class ImageError extends Error {
  override readonly name = 'ImageError';
  readonly code: ImageErrorCode;

  constructor(code: ImageErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
  }
}

export function isImageError(e: unknown, code?: ImageErrorCode): e is ImageError {
  return e instanceof ImageError && (code === undefined || e.code === code);
}

export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
