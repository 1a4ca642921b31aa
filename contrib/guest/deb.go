package main

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// debPackage is a Debian binary package as apt knows it.
type debPackage struct {
	Name    string
	Version string
	SHA256  string // of the .deb, from the archive index
	Depends string
}

// parseAptShow reads the first stanza of `apt-cache show` output.
func parseAptShow(out string) (debPackage, error) {
	var p debPackage
	for _, l := range strings.Split(out, "\n") {
		if l == "" && p.Name != "" {
			break
		}
		k, v, ok := strings.Cut(l, ":")
		if !ok || strings.HasPrefix(l, " ") {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "Package":
			p.Name = v
		case "Version":
			p.Version = v
		case "SHA256":
			p.SHA256 = v
		case "Depends":
			p.Depends = v
		}
	}
	if p.Name == "" || p.Version == "" {
		return p, errors.New("apt-cache show: no package stanza")
	}
	return p, nil
}

// kernelDependency returns the versioned kernel package a metapackage
// (linux-image-amd64) depends on, or "" for a real kernel package.
func kernelDependency(depends string) string {
	for _, alt := range strings.Split(depends, ",") {
		name := strings.Fields(strings.TrimSpace(strings.Split(alt, "|")[0]))
		if len(name) > 0 && strings.HasPrefix(name[0], "linux-image-") {
			return name[0]
		}
	}
	return ""
}

// aptShow asks apt for the candidate version of a package, updating the
// package lists once if apt does not know it.
func aptShow(ctx context.Context, name string, updated *bool) (debPackage, error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", name).Output()
	if err != nil && !*updated {
		*updated = true
		logf("apt-cache does not know %s: running apt-get update", name)
		if uerr := run(ctx, "", "apt-get", "update", "-qq"); uerr != nil {
			return debPackage{}, fmt.Errorf("apt-get update: %w", uerr)
		}
		out, err = exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", name).Output()
	}
	if err != nil {
		return debPackage{}, fmt.Errorf("apt-cache show %s: %w", name, err)
	}
	return parseAptShow(string(out))
}

// resolveKernelPackage follows a kernel metapackage to the package that
// holds the kernel.
func resolveKernelPackage(ctx context.Context, name string) (debPackage, error) {
	updated := false
	for range 3 {
		p, err := aptShow(ctx, name, &updated)
		if err != nil {
			return p, err
		}
		dep := kernelDependency(p.Depends)
		if dep == "" {
			if p.SHA256 == "" {
				return p, fmt.Errorf("apt-cache show %s: no SHA256", name)
			}
			return p, nil
		}
		name = dep
	}
	return debPackage{}, fmt.Errorf("kernel package %s: too many levels of metapackages", name)
}

// aptLists is where apt keeps the package indexes; its modification time
// changes with every apt-get update.
const aptLists = "/var/lib/apt/lists"

// resolveKernelPackageCached is resolveKernelPackage remembered in the
// cache until apt's package lists change (asking apt costs about a second).
func resolveKernelPackageCached(ctx context.Context, cache, name string) (debPackage, error) {
	memo := filepath.Join(cache, "resolved-"+name+".json")
	stamp := ""
	if st, err := os.Stat(aptLists); err == nil {
		stamp = st.ModTime().UTC().Format(time.RFC3339Nano)
	}
	type record struct {
		Stamp   string
		Package debPackage
	}
	var r record
	if b, err := os.ReadFile(memo); err == nil && json.Unmarshal(b, &r) == nil && stamp != "" && r.Stamp == stamp {
		return r.Package, nil
	}
	p, err := resolveKernelPackage(ctx, name)
	if err != nil {
		return p, err
	}
	if st, err := os.Stat(aptLists); err == nil { // apt-get update may have run
		stamp = st.ModTime().UTC().Format(time.RFC3339Nano)
	}
	if b, err := json.Marshal(record{Stamp: stamp, Package: p}); err == nil {
		_ = os.WriteFile(memo, b, 0o644)
	}
	return p, nil
}

// fetchDeb returns the path of p's .deb in the cache, downloading it with
// apt-get download when it is missing or does not match the index.
func fetchDeb(ctx context.Context, cache string, p debPackage) (string, error) {
	dir := filepath.Join(cache, "debs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	path := filepath.Join(dir, fmt.Sprintf("%s_%s_amd64.deb", p.Name, strings.ReplaceAll(p.Version, ":", "%3a")))
	if sum, err := sha256File(path); err == nil && sum == p.SHA256 {
		return path, nil
	}
	tmp, err := os.MkdirTemp(dir, ".download-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	// apt drops privileges to _apt for downloads unless told otherwise;
	// the cache may not be writable by _apt.
	logf("downloading %s=%s", p.Name, p.Version)
	if err := run(ctx, tmp, "apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", p.Name+"="+p.Version); err != nil {
		return "", fmt.Errorf("apt-get download %s=%s: %w", p.Name, p.Version, err)
	}
	got, err := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if err != nil || len(got) != 1 {
		return "", fmt.Errorf("apt-get download %s: expected one .deb, found %v", p.Name, got)
	}
	sum, err := sha256File(got[0])
	if err != nil {
		return "", err
	}
	if sum != p.SHA256 {
		return "", fmt.Errorf("%s: sha256 %s, the archive index says %s", got[0], sum, p.SHA256)
	}
	if err := os.Rename(got[0], path); err != nil {
		return "", err
	}
	return path, nil
}

// walkDeb streams the data archive of a .deb (through dpkg-deb) and calls
// fn for every entry; names have their leading "./" removed.
func walkDeb(ctx context.Context, deb string, fn func(h *tar.Header, r io.Reader) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cmd := exec.CommandContext(ctx, "dpkg-deb", "--fsys-tarfile", deb)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("dpkg-deb: %w", err)
	}
	tr := tar.NewReader(bufio.NewReaderSize(out, 1<<20))
	var walkErr error
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			walkErr = fmt.Errorf("%s: %w", deb, err)
			break
		}
		h.Name = strings.TrimPrefix(h.Name, "./")
		if err := fn(h, tr); err != nil {
			walkErr = err
			break
		}
	}
	if walkErr != nil {
		cancel()
		_ = cmd.Wait()
		return walkErr
	}
	_, _ = io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("dpkg-deb --fsys-tarfile %s: %w: %s", deb, err, stderr.String())
	}
	return nil
}

func sha256File(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func sha256Bytes(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func run(ctx context.Context, dir, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}
