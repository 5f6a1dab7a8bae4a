"""The site: admin agent, executors, communicator, federated clients, model manager, training worker."""
