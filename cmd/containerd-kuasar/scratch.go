package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/urfave/cli/v3"

	"github.com/kuasar-io/containerd-kuasar/contrib/scratch"
)

// scratchCommand runs the daemon on the embedded scratch configuration,
// everything under one directory: for trying containerd-kuasar out next to
// (not instead of) a node's containerd.
func scratchCommand() *cli.Command {
	return &cli.Command{
		Name:  "scratch",
		Usage: "Run the daemon on the embedded default config in a scratch root",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Usage: "Scratch root directory", Value: filepath.Join(os.TempDir(), "containerd-kuasar")},
			&cli.StringFlag{Name: "mirror", Usage: "Registry (host:port, plain HTTP) standing in for public registries"},
			&cli.StringFlag{Name: "default-runtime", Usage: "CRI default runtime handler"},
			&cli.StringFlag{Name: "bridge", Usage: "Pod network bridge", Value: "kuasar0"},
			&cli.StringFlag{Name: "subnet", Usage: "Pod network subnet", Value: "10.250.0.0/16"},
			&cli.StringFlag{Name: "log-level", Usage: "Log level", Value: "info"},
		},
		Action: func(ctx context.Context, cmd *cli.Command) error {
			dir, err := filepath.Abs(cmd.String("dir"))
			if err != nil {
				return err
			}
			l, err := scratch.Write(scratch.Options{
				Dir:            dir,
				Mirror:         cmd.String("mirror"),
				DefaultHandler: cmd.String("default-runtime"),
				Bridge:         cmd.String("bridge"),
				Subnet:         cmd.String("subnet"),
			})
			if err != nil {
				return err
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "containerd-kuasar scratch root %s\nCRI/containerd socket: unix://%s\n", dir, l.Address)
			return syscall.Exec(self, []string{self, "--config", l.Config, "--log-level", cmd.String("log-level")}, os.Environ())
		},
	}
}
