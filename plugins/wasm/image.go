package wasm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/fsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost"
)

// imageNameAnnotation is where CRI names a container's image.
const imageNameAnnotation = "io.kubernetes.cri.image-name"

// moduleMediaTypes are the layer media types that carry a WASI preview 1
// module.
var moduleMediaTypes = map[string]bool{
	"application/vnd.wasm.content.layer.v1+wasm": true, // runwasi, Docker
	"application/vnd.w3c.wasm.module.v1+wasm":    true,
	"application/wasm":                           true, // CNCF Wasm OCI artifact
}

// componentMediaTypes carry Wasm components (WASI preview 2), which the
// host does not run.
var componentMediaTypes = map[string]bool{
	"application/vnd.bytecodealliance.wasm.component.layer.v0+wasm": true,
}

// moduleFromImage finds the module of a container whose image carries it
// in a Wasm layer. It returns a zero Module when the image has no Wasm
// layer: the module is then a file of the image's rootfs.
func (k *kind) moduleFromImage(ctx context.Context, ns, image, arg0 string) (wasmhost.Module, error) {
	if image == "" {
		return wasmhost.Module{}, nil
	}
	ctx = namespaces.WithNamespace(ctx, ns)
	img, err := k.images.Get(ctx, image)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return wasmhost.Module{}, nil // not a CRI image we know: use the rootfs
		}
		return wasmhost.Module{}, fmt.Errorf("looking up image %s: %w", image, err)
	}
	layers, err := k.wasmLayers(ctx, img.Target)
	if err != nil {
		return wasmhost.Module{}, err
	}
	if len(layers) == 0 {
		return wasmhost.Module{}, nil
	}
	layer, err := pickLayer(layers, arg0)
	if err != nil {
		return wasmhost.Module{}, fmt.Errorf("image %s: %w", image, err)
	}
	if layer.Size > wasmhost.MaxModuleSize {
		return wasmhost.Module{}, fmt.Errorf("image %s: module layer of %d bytes, over the limit of %d: %w",
			image, layer.Size, wasmhost.MaxModuleSize, errdefs.ErrInvalidArgument)
	}
	p, err := k.blobPath(ctx, layer)
	if err != nil {
		return wasmhost.Module{}, fmt.Errorf("image %s: module layer %s: %w", image, layer.Digest, err)
	}
	return wasmhost.Module{Path: p, Digest: layer.Digest.String()}, nil
}

// wasmLayers lists the Wasm layers of the image's manifest for this
// platform, or of its first manifest that has any.
func (k *kind) wasmLayers(ctx context.Context, target ocispec.Descriptor) ([]ocispec.Descriptor, error) {
	var manifests []ocispec.Descriptor
	switch {
	case images.IsManifestType(target.MediaType):
		manifests = []ocispec.Descriptor{target}
	case images.IsIndexType(target.MediaType):
		var idx ocispec.Index
		if err := readJSON(ctx, k.content, target, &idx); err != nil {
			return nil, err
		}
		match := platforms.Default()
		for _, m := range idx.Manifests {
			if m.Platform == nil || match.Match(*m.Platform) || m.Platform.OS == "wasip1" || m.Platform.OS == "wasi" {
				manifests = append(manifests, m)
			}
		}
	default:
		return nil, nil
	}
	for _, md := range manifests {
		var m ocispec.Manifest
		if err := readJSON(ctx, k.content, md, &m); err != nil {
			if errdefs.IsNotFound(err) {
				continue // another platform's, not pulled
			}
			return nil, err
		}
		var layers []ocispec.Descriptor
		for _, l := range m.Layers {
			if componentMediaTypes[l.MediaType] {
				return nil, fmt.Errorf("the image carries a Wasm component (%s): WASI preview 2 components are not supported by %s, only preview 1 modules: %w",
					l.MediaType, ID, errdefs.ErrNotImplemented)
			}
			if moduleMediaTypes[l.MediaType] {
				layers = append(layers, l)
			}
		}
		if len(layers) > 0 {
			return layers, nil
		}
	}
	return nil, nil
}

// pickLayer chooses the module among an image's Wasm layers: the only one,
// or the one whose title is the command's base name.
func pickLayer(layers []ocispec.Descriptor, arg0 string) (ocispec.Descriptor, error) {
	if len(layers) == 1 {
		return layers[0], nil
	}
	var titles []string
	for _, l := range layers {
		title := l.Annotations[ocispec.AnnotationTitle]
		if title != "" && path.Base(title) == path.Base(arg0) {
			return l, nil
		}
		titles = append(titles, title)
	}
	return ocispec.Descriptor{}, fmt.Errorf("%d Wasm layers (%s) and none titled %q, the command's module: %w",
		len(layers), strings.Join(titles, ", "), path.Base(arg0), errdefs.ErrInvalidArgument)
}

func readJSON(ctx context.Context, cs content.Store, desc ocispec.Descriptor, v any) error {
	b, err := content.ReadBlob(ctx, cs, desc)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decoding %s: %w", desc.MediaType, err)
	}
	return nil
}

// blobPath returns a file holding a layer blob, for the host to read: the
// local content store's own file, or a copy when the store is elsewhere.
func (k *kind) blobPath(ctx context.Context, layer ocispec.Descriptor) (string, error) {
	if _, err := k.content.Info(ctx, layer.Digest); err != nil {
		return "", err
	}
	if err := layer.Digest.Validate(); err != nil {
		return "", fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	p := filepath.Join(k.contentRoot, layer.Digest.Algorithm().String(), layer.Digest.Encoded())
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	copyPath := filepath.Join(k.blobDir, layer.Digest.Encoded())
	if _, err := os.Stat(copyPath); err == nil {
		return copyPath, nil
	}
	if err := os.MkdirAll(k.blobDir, 0o700); err != nil {
		return "", err
	}
	ra, err := k.content.ReaderAt(ctx, layer)
	if err != nil {
		return "", err
	}
	defer ra.Close()
	b, err := io.ReadAll(io.NewSectionReader(ra, 0, ra.Size()))
	if err != nil {
		return "", err
	}
	if digest.FromBytes(b) != layer.Digest {
		return "", errors.New("content does not match its digest")
	}
	return copyPath, fsutil.WriteFileAtomic(copyPath, b, 0o600)
}
