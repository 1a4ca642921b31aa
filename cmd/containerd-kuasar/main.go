// Command containerd-kuasar is containerd v2 with the Kuasar sandbox
// controllers compiled in. It accepts every containerd flag and subcommand.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/cmd/containerd/command"
	"github.com/urfave/cli/v3"

	"github.com/kuasar-io/containerd-kuasar/builtins"
	"github.com/kuasar-io/containerd-kuasar/cmd/internal/version"
)

const usage = `containerd with Kuasar sandboxes: microVM, application kernel,
WebAssembly and namespaces, each selected by CRI runtime handler, served
in-process with no pause container and no shim per pod.`

func main() {
	if err := builtins.Prepare(); err != nil {
		fmt.Fprintln(os.Stderr, "containerd-kuasar:", err)
		os.Exit(1)
	}

	app := command.App()
	app.Name = version.Name
	app.Usage = usage
	app.Version = version.Version
	app.Commands = append(app.Commands, scratchCommand())
	serve := app.Action
	app.Action = func(ctx context.Context, cmd *cli.Command) error {
		// The daemon itself (containerd answers other arguments with help):
		// a typo in a Kuasar plugin's section stops it here, where
		// containerd would only warn and run on the default.
		if cmd.Args().First() == "" {
			if err := builtins.CheckConfig(ctx, cmd.String("config"), cmd.IsSet("config")); err != nil {
				return err
			}
		}
		return serve(ctx, cmd)
	}
	cli.VersionPrinter = func(cmd *cli.Command) { version.Fprint(cmd.Root().Writer) }

	if err := app.Run(context.Background(), os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "containerd-kuasar:", err)
		os.Exit(1)
	}
}
