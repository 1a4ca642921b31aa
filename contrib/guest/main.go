// Command guest builds the kuasar-vmm guest image: Debian's kernel as an
// uncompressed vmlinux (booted through its PVH entry) and an initramfs whose
// /init is the kuasar-vmm agent, with the kernel modules the guest needs and
// runc with its libraries. `make guest` runs it.
//
// Builds are reproducible (the same inputs give byte-identical files) and
// cached under <cache>/<key>, the key being a hash of every input: the
// kernel package (name, version, digest), the agent and runc binaries and
// runc's libraries, the module list, the compression and builderVersion. A
// rebuild with unchanged inputs only hashes them. The kernel's files are
// cached on their own (<cache>/kernel-<key>), so a new agent does not
// unpack the kernel package again.
//
// It prints the image's kernel_path and initrd_path, and with -out links
// (or copies, with -copy) the image's files into a directory.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// builderVersion changes whenever the image's layout or content rules
// change, so that cached images are rebuilt.
const builderVersion = "1"

type options struct {
	cache       string
	agent       string
	runc        string
	kernelPkg   string
	kernelDeb   string
	out         string
	copy        bool
	compression string
}

func main() {
	var o options
	flag.StringVar(&o.cache, "cache", defaultCache(), "cache directory of guest images")
	flag.StringVar(&o.agent, "agent", "", "kuasar-vmm-agent binary (static)")
	flag.StringVar(&o.runc, "runc", "/usr/sbin/runc", "runc binary to put in the guest (its libraries come along)")
	flag.StringVar(&o.kernelPkg, "kernel-package", "linux-image-amd64", "Debian kernel package (a metapackage is followed to its kernel)")
	flag.StringVar(&o.kernelDeb, "kernel-deb", "", "use this kernel .deb instead of asking apt")
	flag.StringVar(&o.out, "out", "", "directory to link the image's files into")
	flag.BoolVar(&o.copy, "copy", false, "with -out, copy the files instead of linking them")
	flag.StringVar(&o.compression, "compression", "none", "initramfs compression: none (fastest boot) or gzip (smallest)")
	flag.Parse()
	if o.agent == "" {
		fmt.Fprintln(os.Stderr, "guest: -agent is required")
		os.Exit(2)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	start := time.Now()
	img, cached, err := build(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "guest:", err)
		os.Exit(1)
	}
	if o.out != "" {
		if err := publish(img, o.out, o.copy); err != nil {
			fmt.Fprintln(os.Stderr, "guest:", err)
			os.Exit(1)
		}
	}
	how := "built"
	if cached {
		how = "cached"
	}
	st, _ := os.Stat(img.Initrd)
	logf("image %s %s in %.1fs (kernel %s, initramfs %.1f MiB)", img.Key, how,
		time.Since(start).Seconds(), img.KernelRelease, float64(st.Size())/(1<<20))
	fmt.Printf("kernel_path = %q\ninitrd_path = %q\n", img.Kernel, img.Initrd)
}

func defaultCache() string {
	if d := os.Getenv("KUASAR_CACHE_DIR"); d != "" {
		return filepath.Join(d, "guest")
	}
	return "/var/cache/containerd-kuasar/guest"
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "guest: "+format+"\n", args...)
}

// publish puts the image's files into dir, replacing what was there.
func publish(img *guest.Image, dir string, copyFiles bool) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, name := range []string{guest.KernelFile, guest.InitrdFile, guest.ManifestFile} {
		src, dst := filepath.Join(img.Dir, name), filepath.Join(dir, name)
		tmp := dst + ".tmp"
		_ = os.Remove(tmp)
		var err error
		if copyFiles {
			var b []byte
			if b, err = os.ReadFile(src); err == nil {
				err = os.WriteFile(tmp, b, 0o644)
			}
		} else {
			err = os.Symlink(src, tmp)
		}
		if err == nil {
			err = os.Rename(tmp, dst)
		}
		if err != nil {
			return fmt.Errorf("publishing %s: %w", name, err)
		}
	}
	return nil
}

// keyOf hashes named inputs in a stable order into a short key.
func keyOf(inputs [][2]string) string {
	var b strings.Builder
	for _, kv := range inputs {
		fmt.Fprintf(&b, "%s=%s\n", kv[0], kv[1])
	}
	return sha256Bytes([]byte(b.String()))[:16]
}
