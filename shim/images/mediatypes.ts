// Media types the client accepts. Everything else is refused before it reaches a store.

export const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
export const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
export const OCI_LAYER_TAR = 'application/vnd.oci.image.layer.v1.tar';
export const OCI_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
export const OCI_LAYER_ZSTD = 'application/vnd.oci.image.layer.v1.tar+zstd';
export const OCI_LAYER_NONDIST_GZIP = 'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip';

export const DOCKER_MANIFEST_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';
export const DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';
export const DOCKER_CONFIG = 'application/vnd.docker.container.image.v1+json';
export const DOCKER_LAYER_GZIP = 'application/vnd.docker.image.rootfs.diff.tar.gzip';
export const DOCKER_LAYER_FOREIGN_GZIP = 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip';

export const INDEX_TYPES: readonly string[] = [OCI_INDEX, DOCKER_MANIFEST_LIST];
export const MANIFEST_TYPES: readonly string[] = [OCI_MANIFEST, DOCKER_MANIFEST];
export const CONFIG_TYPES: readonly string[] = [OCI_CONFIG, DOCKER_CONFIG];

/** The Accept header of every manifest request: the registry serves OCI manifests only
 *  to clients that name the OCI types. */
export const MANIFEST_ACCEPT = [OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST].join(', ');

export type LayerCompressionHint = 'gzip' | 'zstd' | 'none' | 'auto';

/** Compression of a layer blob from its media type; unknown layer types are sniffed by the converter. */
export function layerCompression(mediaType: string): LayerCompressionHint {
  switch (mediaType) {
    case OCI_LAYER_GZIP:
    case OCI_LAYER_NONDIST_GZIP:
    case DOCKER_LAYER_GZIP:
    case DOCKER_LAYER_FOREIGN_GZIP:
      return 'gzip';
    case OCI_LAYER_ZSTD:
      return 'zstd';
    case OCI_LAYER_TAR:
      return 'none';
    default:
      return 'auto';
  }
}
