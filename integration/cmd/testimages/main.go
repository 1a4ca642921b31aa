// Command testimages builds the local test images and serves them from a
// local registry, for `make demo` and manual runs. It keeps the registry
// running in the foreground until interrupted, unless -push-only.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
)

func main() {
	addr := flag.String("registry", "127.0.0.1:5000", "registry address")
	dir := flag.String("dir", "/var/tmp/kuasar-registry", "registry storage")
	pushOnly := flag.Bool("push-only", false, "push to an already running registry and exit")
	critest := flag.Bool("critest", false, "also the images critest pulls (stand-ins under their original names)")
	flag.StringVar(&images.CacheDir, "cache", "", "where downloads for image builds are kept (default: under the temp dir)")
	flag.Parse()
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	var reg *images.Registry
	if !*pushOnly {
		var err error
		if reg, err = images.StartRegistry(ctx, *addr, *dir); err != nil {
			fail(err)
		}
		defer reg.Stop()
	}
	if err := images.PushAll(ctx, *addr); err != nil {
		fail(err)
	}
	if *critest {
		if err := images.PushSet(ctx, *addr, images.CritestBuilders); err != nil {
			fail(err)
		}
	}
	fmt.Println("images pushed to", *addr)
	if !*pushOnly {
		<-ctx.Done()
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "testimages:", err)
	os.Exit(1)
}
