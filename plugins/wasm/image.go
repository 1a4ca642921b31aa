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
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/fsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
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
// in a Wasm layer. It returns nil when the image has no Wasm layer, or
// when no image is known: the module is then a file of the rootfs.
func (k *kind) moduleFromImage(ctx context.Context, c *task.Container) (*api.Module, error) {
	ctx = namespaces.WithNamespace(ctx, c.Namespace)
	img, ok, err := k.imageOf(ctx, c)
	if err != nil || !ok {
		return nil, err
	}
	layers, err := k.wasmLayers(ctx, img.Target)
	if err != nil {
		return nil, err
	}
	if len(layers) == 0 {
		return nil, nil
	}
	layer, err := pickLayer(layers, c.Spec.Process.Args[0])
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", img.Name, err)
	}
	if layer.Size > wasmhost.MaxModuleSize {
		return nil, fmt.Errorf("image %s: module layer of %d bytes, over the limit of %d: %w",
			img.Name, layer.Size, wasmhost.MaxModuleSize, errdefs.ErrInvalidArgument)
	}
	p, err := k.blobPath(ctx, layer)
	if err != nil {
		return nil, fmt.Errorf("image %s: module layer %s: %w", img.Name, layer.Digest, err)
	}
	return &api.Module{Path: p, Digest: layer.Digest.String()}, nil
}

// criContainerMetadata is where CRI keeps its record of a container in
// containerd's (the "metadata" extension, JSON of CRI's
// store/container.Metadata; only what is read here).
const criContainerMetadata = "io.cri-containerd.container.metadata"

type criMetadata struct {
	Version  string
	Metadata struct {
		// ImageName is the reference CRI resolved the image to; ImageDigest
		// the digest of its target.
		ImageName   string
		ImageDigest string
	}
}

// imageOf finds the image a container was made from. The most reliable
// source is containerd's record of the container: the image it names, or
// the one CRI resolved (its metadata), which is right however the user
// wrote the name. Without one (a container not made by CRI), the name in
// CRI's image-name annotation is taken as the user wrote it (a short name,
// a tag, a digest, an image ID) and resolved as containerd resolves
// references. ok is false when no image is known.
func (k *kind) imageOf(ctx context.Context, c *task.Container) (images.Image, bool, error) {
	var names []string
	var digests []digest.Digest
	rec, err := k.records.Get(ctx, c.ID)
	switch {
	case err == nil:
		if rec.Image != "" {
			names = append(names, rec.Image)
		}
		if ext, ok := rec.Extensions[criContainerMetadata]; ok && ext != nil {
			var m criMetadata
			if json.Unmarshal(ext.GetValue(), &m) == nil {
				if m.Metadata.ImageName != "" {
					names = append(names, m.Metadata.ImageName)
				}
				if d, err := digest.Parse(m.Metadata.ImageDigest); err == nil {
					digests = append(digests, d)
				}
			}
		}
	case !errdefs.IsNotFound(err):
		return images.Image{}, false, fmt.Errorf("looking up container %s: %w", c.ID, err)
	}
	var id digest.Digest
	if c.Spec != nil {
		if name := c.Spec.Annotations[imageNameAnnotation]; name != "" {
			ref, d, imageID := normalizeImageName(name)
			if ref != "" {
				names = append(names, ref)
			}
			if d != "" {
				digests = append(digests, d)
			}
			id = imageID
		}
	}
	for _, n := range names {
		img, err := k.images.Get(ctx, n)
		if err == nil {
			return img, true, nil
		}
		if !errdefs.IsNotFound(err) {
			return images.Image{}, false, fmt.Errorf("looking up image %s: %w", n, err)
		}
	}
	for _, d := range digests {
		imgs, err := k.images.List(ctx, "target.digest=="+d.String())
		if err != nil {
			return images.Image{}, false, fmt.Errorf("looking up image %s: %w", d, err)
		}
		if len(imgs) > 0 {
			return imgs[0], true, nil
		}
	}
	if id != "" {
		return k.imageByID(ctx, id)
	}
	return images.Image{}, false, nil
}

// normalizeImageName reads an image name as a user or the kubelet writes
// it: a reference in any form containerd accepts ("app", "app:tag",
// "org/app@sha256:...", "registry:5000/app:tag"), returned in its full
// form, with its digest if it has one; or an image ID ("sha256:...", the
// digest of the image's config).
func normalizeImageName(name string) (ref string, dgst, id digest.Digest) {
	if d, err := digest.Parse(name); err == nil {
		return "", "", d
	}
	named, err := reference.ParseDockerRef(name)
	if err != nil {
		return "", "", ""
	}
	if c, ok := named.(reference.Canonical); ok {
		dgst = c.Digest()
	}
	return named.String(), dgst, ""
}

// imageByID finds the image whose config has digest id (CRI's image ID).
func (k *kind) imageByID(ctx context.Context, id digest.Digest) (images.Image, bool, error) {
	imgs, err := k.images.List(ctx)
	if err != nil {
		return images.Image{}, false, fmt.Errorf("listing images: %w", err)
	}
	for _, img := range imgs {
		cfg, err := images.Config(ctx, k.content, img.Target, wasmPlatforms{})
		if err == nil && cfg.Digest == id {
			return img, true, nil
		}
	}
	return images.Image{}, false, nil
}

// wasmPlatforms matches the platforms a Wasm image's manifests are for:
// the node's, and WASI's.
type wasmPlatforms struct{}

func (wasmPlatforms) Match(p ocispec.Platform) bool {
	return platforms.Default().Match(p) || p.OS == "wasip1" || p.OS == "wasi"
}

func (wasmPlatforms) Less(a, b ocispec.Platform) bool { return platforms.Default().Less(a, b) }

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
		for _, m := range idx.Manifests {
			if m.Platform == nil || (wasmPlatforms{}).Match(*m.Platform) {
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
