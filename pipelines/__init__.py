"""Entry points, Ray Data steps and Ray Train loops of wuerstchen-ray."""
