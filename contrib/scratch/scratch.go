// Package scratch lays out a self-contained containerd-kuasar root: a
// config (the embedded default for scratch use), a CNI bridge network and
// registry mirrors, all under one directory. `containerd-kuasar scratch`,
// the end-to-end tests and the benchmark use it, so that a daemon shares
// nothing with the node's containerd.
package scratch

import (
	"bytes"
	_ "embed"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"text/template"
)

//go:embed config.toml.tmpl
var configTemplate string

//go:embed cni.conflist.tmpl
var cniTemplate string

// Options of a scratch root.
type Options struct {
	// Dir holds everything; it must be absolute and short enough for Unix
	// socket paths beneath it.
	Dir string
	// Bridge and Subnet of the pod network (defaults: kuasar0, 10.250.0.0/16).
	Bridge string
	Subnet string
	// Mirror is a registry (host:port, plain HTTP) that serves every
	// image, standing in for the public registries.
	Mirror string
	// DefaultHandler is CRI's default runtime handler ("" keeps runc).
	DefaultHandler string
	// CNIBinDirs are where CNI plugins are looked for.
	CNIBinDirs []string
	// PortMap adds the portmap CNI plugin (host ports; it edits the
	// host's iptables for as long as pods use host ports).
	PortMap bool
}

// MirroredRegistries are redirected to Options.Mirror.
var MirroredRegistries = []string{"docker.io", "registry.k8s.io", "gcr.io", "quay.io", "ghcr.io"}

// Layout is what Write produced.
type Layout struct {
	Config  string // config.toml path
	Address string // containerd's gRPC socket
}

// Write renders the scratch root and returns its layout.
func Write(o Options) (Layout, error) {
	if !filepath.IsAbs(o.Dir) {
		return Layout{}, fmt.Errorf("scratch dir %q must be absolute", o.Dir)
	}
	if o.Bridge == "" {
		o.Bridge = "kuasar0"
	}
	if o.Subnet == "" {
		o.Subnet = "10.250.0.0/16"
	}
	if _, _, err := net.ParseCIDR(o.Subnet); err != nil {
		return Layout{}, fmt.Errorf("subnet: %w", err)
	}
	if len(o.CNIBinDirs) == 0 {
		o.CNIBinDirs = []string{"/usr/lib/cni", "/opt/cni/bin"}
	}
	if len(filepath.Join(o.Dir, "state", "k", "0123456789abcdef01234567.sock")) > 107 {
		return Layout{}, fmt.Errorf("scratch dir %q is too long for Unix socket paths", o.Dir)
	}
	for _, d := range []string{"root", "state", "s", "cni/net.d", "cni/ipam", "certs.d"} {
		if err := os.MkdirAll(filepath.Join(o.Dir, d), 0o711); err != nil {
			return Layout{}, err
		}
	}
	cfg := filepath.Join(o.Dir, "config.toml")
	if err := render(configTemplate, o, cfg); err != nil {
		return Layout{}, err
	}
	if err := render(cniTemplate, o, filepath.Join(o.Dir, "cni/net.d/10-kuasar.conflist")); err != nil {
		return Layout{}, err
	}
	if o.Mirror != "" {
		if err := writeMirrors(filepath.Join(o.Dir, "certs.d"), o.Mirror); err != nil {
			return Layout{}, err
		}
	}
	return Layout{Config: cfg, Address: filepath.Join(o.Dir, "containerd.sock")}, nil
}

func render(tmpl string, o Options, path string) error {
	t, err := template.New(filepath.Base(path)).Parse(tmpl)
	if err != nil {
		return err
	}
	var b bytes.Buffer
	if err := t.Execute(&b, o); err != nil {
		return err
	}
	return os.WriteFile(path, b.Bytes(), 0o644)
}

// writeMirrors points every public registry, and the mirror itself, at the
// mirror over plain HTTP.
func writeMirrors(dir, mirror string) error {
	for _, host := range append([]string{mirror}, MirroredRegistries...) {
		server := "https://" + host
		if host == "docker.io" {
			server = "https://registry-1.docker.io"
		}
		if host == mirror {
			server = "http://" + mirror
		}
		content := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", server, "http://"+mirror)
		if err := os.MkdirAll(filepath.Join(dir, host), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, host, "hosts.toml"), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}
